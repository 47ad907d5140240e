"""The human-readable evaluation report (Markdown) and the plot data DVC renders.

Plots (reports/eval/plots/):
    headline.json     the 0-1 headline metrics of base and tuned, one row per (metric, model); dvc.yaml's
                      top-level `plots:` overlays the two models in one bar chart on a 0-1 axis
    by_category.json  ROUGE-L and fact recall per topic and model; each topic's label carries its n
    metrics.png       the same comparison as an image (embedded in report.md)
"""

from __future__ import annotations

import json
from pathlib import Path

# Headline metrics on a 0-1 scale, in report order (label, key, higher is better)
HEADLINE = [
    ("ROUGE-L", "rouge_l", True),
    ("BLEU-4", "bleu4", True),
    ("BERTScore F1", "bertscore_f1", True),
    ("Semantic similarity", "semantic_similarity", True),
    ("Exact match", "exact_match", True),
    ("Fact recall", "fact_recall", True),
    ("No end token (rate)", "no_end_token_rate", False),
    ("Degenerate: loops, cut mid-sentence (rate)", "degenerate_rate", False),
]
OTHER = [
    ("Length ratio (1 = reference length)", "length_ratio", None),
    ("Validation loss", "val_loss", False),
    ("Validation perplexity", "val_perplexity", False),
    ("LLM judge (1-5)", "judge_score", True),
]
SMALL_GROUP = 10  # per-topic groups below this many records get a warning in the report


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        return f"{value:,.{digits}f}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _guard_text(decoding: dict) -> str:
    parts = []
    if decoding.get("repetition_penalty", 1.0) != 1.0:
        parts.append(f"repetition_penalty {decoding['repetition_penalty']:g}")
    if decoding.get("no_repeat_ngram_size"):
        parts.append(f"no_repeat_ngram_size {decoding['no_repeat_ngram_size']}")
    return f", repetition guard {', '.join(parts)}" if parts else ", no repetition guard"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _signed(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if abs(value) >= 1e5:
        return f"{value:+.3e}"
    return f"{value:+.{digits}f}"


def write_plots(metrics: dict, plot_dir: str | Path) -> dict[str, str]:
    """Write the plot data (and a PNG); returns {name: file name} relative to the report folder.

    headline.json     [{"metric": "ROUGE-L", "model": "base"|"tuned", "value": ...}]: one chart, base and
                      tuned overlaid (dvc.yaml's top-level `plots:` with .dvc/plots/bars_by_model.json)
    by_category.json  [{"topic": "leave (n=7)", "model": ..., "rouge_l": ..., "fact_recall": ...}]: the
                      topic label carries its record count, so a bar resting on 1 record says so
    """
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    headline, by_topic = [], []
    for label, key, higher in HEADLINE:
        for model in ("base", "tuned"):
            value = metrics[model].get(key)
            if isinstance(value, (int, float)):
                headline.append({"metric": label if higher else f"{label}, lower is better", "model": model,
                                 "value": value})
    for category, group in metrics.get("by_category", {}).items():
        for model in ("base", "tuned"):
            by_topic.append({"topic": f"{category} (n={group['n']})", "model": model,
                             "rouge_l": group[model].get("rouge_l"), "fact_recall": group[model].get("fact_recall")})
    files = {}
    for name, rows in (("headline", headline), ("by_category", by_topic)):
        (plot_dir / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        files[name] = f"plots/{name}.json"
    try:
        files["image"] = _bar_chart(metrics, plot_dir / "metrics.png")
    except ImportError:  # matplotlib missing: the JSON plots and the tables still say everything
        pass
    return files


def _bar_chart(metrics: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, key, _ in HEADLINE]
    keys = [key for _, key, _ in HEADLINE]
    base = [metrics["base"].get(k) or 0.0 for k in keys]
    tuned = [metrics["tuned"].get(k) or 0.0 for k in keys]
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    y = range(len(keys))
    ax.barh([i + 0.2 for i in y], base, height=0.4, label="base", color="#9aa5b1")
    ax.barh([i - 0.2 for i in y], tuned, height=0.4, label="tuned", color="#2b7bb9")
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (0-1)")
    ax.set_title(f"Base vs tuned on the test split (n={metrics.get('n_test')})")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"plots/{path.name}"


def _cell(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def worst(predictions: list[dict], n: int) -> list[dict]:
    """The n weakest tuned answers: lowest mean of ROUGE-L and fact recall (ROUGE-L alone without facts)."""
    def quality(row):
        t = row["tuned"]
        parts = [t["rouge_l"]] + ([t["fact_recall"]] if t.get("fact_recall") is not None else [])
        return (sum(parts) / len(parts), t["rouge_l"], str(row["id"]))

    return sorted(predictions, key=quality)[:n]


def judge_line(metrics: dict) -> str:
    judge = metrics.get("judge") or {}
    if not judge.get("enabled"):
        return "LLM judge: off (evaluate.judge.enabled is false; no judge score is reported)."
    line = (f"LLM judge: {judge.get('endpoint')}, first {judge.get('records')} answers per model; mean score "
            f"base {_fmt(metrics['base'].get('judge_score'), 2)}, tuned {_fmt(metrics['tuned'].get('judge_score'), 2)} (1-5).")
    if judge.get("failed_calls"):
        line += f" {judge['failed_calls']} call(s) failed and are left out: {'; '.join(judge.get('failures', []))}"
    return line


def _ci(test: dict | None) -> str:
    ci = (test or {}).get("ci")
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci and None not in ci else ""


def significance_lines(metrics: dict) -> list[str]:
    """Tuned vs base with 95% intervals, and the smallest difference this test split can detect."""
    sig = metrics.get("significance") or {}
    tests = sig.get("tuned_vs_base") or {}
    if not tests:
        return []
    n = (metrics.get("test_set") or {}).get("n", metrics.get("n_test"))
    lines = ["## Is the difference real?", "",
             f"Paired over the {n} test records: {sig.get('method', '')}.", "",
             "| metric | tuned - base (mean per record) | 95% CI | p | verdict | smallest detectable difference |",
             "|---|---:|---|---:|---|---:|"]
    for key, t in tests.items():
        lines.append(f"| {key} | {_signed(t.get('delta'), 4)} | {_ci(t)} | {_fmt(t.get('p'), 4)} | {t.get('verdict')} | "
                     f"{_fmt(t.get('mde'), 4)} |")
    if sig.get("warning"):
        lines += ["", f"**Warning:** {sig['warning']}"]
    detectable = {k: v for k, v in (sig.get("detectable_difference") or {}).items() if v is not None}
    if "rouge_l" in detectable:
        lines += ["", f"With {n} test records, a change of ROUGE-L smaller than about {detectable['rouge_l']:.3f} "
                      "(alpha 0.05, power 0.8, from the paired per-record standard deviation of tuned vs base) is "
                      "likely to be missed; docs/evaluation.md says how to raise the sensitivity."]
    return lines + [""]


def render_report(metrics: dict, predictions: list[dict], worst_n: int, plots: dict[str, str]) -> str:
    base, tuned, delta = metrics["base"], metrics["tuned"], metrics.get("delta", {})
    gate = metrics.get("gate", {})
    lines = ["# Evaluation report", ""]
    verdict = "PASSED" if gate.get("passed") else "FAILED"
    lines.append(f"**Quality gate: {verdict}**" + ("" if gate.get("passed") else " — " + "; ".join(gate.get("reasons", []))))
    if not gate.get("passed") and gate.get("likely_causes"):
        lines += ["", "Likely causes, from this run's own figures, and what to change:", ""]
        lines += [f"- {cause}" for cause in gate["likely_causes"]]
    elif not gate.get("passed"):
        lines += ["", "None of the usual causes (few steps, truncated answers, loops, a small test split, a "
                      "diverged learning rate) shows in this run's figures; read the worst answers below."]
    lines += ["", f"Test records: {metrics.get('n_test')} ({metrics.get('n_with_facts')} with key facts); "
                  f"validation records: {metrics.get('n_val')}. Greedy decoding"
                  f"{_guard_text(metrics.get('decoding') or {})} (params decoding).", ""]
    budget = metrics.get("answer_budget")
    if budget:
        hit = budget.get("hit_rate") or {}
        lines += [f"Answers: up to {budget['max_new_tokens']} new tokens ({budget['rule']}); "
                  f"{_pct(hit.get('base'))} of base and {_pct(hit.get('tuned'))} of tuned answers hit that limit.", ""]
    lines += ["## Headline", "", "| metric | base | tuned | tuned - base |", "|---|---:|---:|---:|"]
    for label, key, _ in HEADLINE + OTHER:
        if key == "judge_score" and key not in tuned:
            continue
        lines.append(f"| {label} | {_fmt(base.get(key))} | {_fmt(tuned.get(key))} | {_signed(delta.get(key))} |")
    lines += ["", judge_line(metrics), ""]
    if plots.get("image"):
        lines += [f"![base vs tuned]({plots['image']})", ""]
    lines += significance_lines(metrics)

    ref = metrics.get("reference")
    if ref:
        lines += [f"## Compared with {ref['source']}", ""]
        if ref.get("not_comparable"):
            lines += [f"**Not comparable:** {ref['not_comparable']}. The changes below are not regressions or "
                      "improvements: they measure different test sets.", ""]
        else:
            lines += [f"Tolerance {ref['tolerance']:g}; regressions (a drop beyond the tolerance AND significant): "
                      f"{', '.join(ref['regressions']) or 'none'}." + (f" Note: {ref['note']}." if ref.get("note") else ""),
                      ""]
        tests = ref.get("significance") or {}
        lines += ["| metric | reference | now | change | 95% CI | p | verdict |", "|---|---:|---:|---:|---|---:|---|"]
        for key, d in ref["delta"].items():
            t = tests.get(key) or {}
            lines.append(f"| {key} | {_fmt(ref['tuned'].get(key))} | {_fmt(tuned.get(key))} | {_signed(d)} | "
                         f"{_ci(t)} | {_fmt(t.get('p'), 4) if t else ''} | {t.get('verdict', '')} |")
        lines.append("")

    lines += ["## Quality gate", "", "| check | metric | value | threshold | result |", "|---|---|---:|---:|---|"]
    for c in gate.get("checks", []):
        lines.append(f"| {c['check']} | {c['metric']} | {_fmt(c['value'], 4)} | {c['threshold']:g} | "
                     f"{'pass' if c['passed'] else '**FAIL**'} |")
    lines.append("")

    for title, key in (("Per topic", "by_category"), ("Fact seen in training vs not", "by_fact_seen")):
        groups = metrics.get(key)
        if not groups:
            continue
        small = sorted(name for name, g in groups.items() if g["n"] < SMALL_GROUP)
        lines += [f"## {title}", ""]
        if small:
            lines += [f"Groups with fewer than {SMALL_GROUP} records ({', '.join(small)}) are anecdotes: one answer "
                      "moves their mean by a large step; read them as examples, not as measurements.", ""]
        lines += ["| group | n | ROUGE-L base | ROUGE-L tuned | BLEU-4 tuned | BERTScore tuned | similarity tuned | "
                  "fact recall base | fact recall tuned | exact match tuned | no end token tuned |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, g in groups.items():
            b, t = g["base"], g["tuned"]
            lines.append(f"| {name} | {g['n']} | {_fmt(b['rouge_l'])} | {_fmt(t['rouge_l'])} | {_fmt(t['bleu4'])} | "
                         f"{_fmt(t['bertscore_f1'])} | {_fmt(t['semantic_similarity'])} | {_fmt(b['fact_recall'])} | "
                         f"{_fmt(t['fact_recall'])} | {_fmt(t['exact_match'])} | {_fmt(t['no_end_token_rate'])} |")
        lines.append("")

    degenerate = [row for row in predictions if (row.get("tuned") or {}).get("degenerate_reason")]
    lines += ["## Degenerate answers", ""]
    if not degenerate:
        lines += ["No tuned answer loops or stops mid-sentence (a sentence said twice, 8 words said three times, "
                  "or no end token and no closing punctuation).", ""]
    else:
        shown = degenerate[:max(worst_n, 1)]
        lines += [f"{len(degenerate)} of {len(predictions)} tuned answers; the first {len(shown)}:", "",
                  "| test record | why | tuned answer |", "|---|---|---|"]
        lines += [f"| `{row['id']}` | {_cell(row['tuned']['degenerate_reason'], 120)} | {_cell(row['tuned']['answer'])} |"
                  for row in shown]
        lines.append("")

    if worst_n:
        lines += [f"## Worst {min(worst_n, len(predictions))} tuned answers", "",
                  "Ranked by the mean of ROUGE-L and fact recall. Missing facts are those of the reference "
                  "that the tuned answer does not state.", ""]
        for rank, row in enumerate(worst(predictions, worst_n), 1):
            t, b = row["tuned"], row["base"]
            lines += [f"### {rank}. {_cell(row['instruction'])}", "",
                      f"test record `{row['id']}`, topic `{row['category']}`, fact seen in training: "
                      f"{row.get('fact_seen_in_train')}", "",
                      "| | answer | ROUGE-L | fact recall | ended |", "|---|---|---:|---:|---|",
                      f"| reference | {_cell(row['reference'])} | | | |",
                      f"| tuned | {_cell(t['answer']) or '(empty)'} | {_fmt(t['rouge_l'])} | {_fmt(t['fact_recall'])} | "
                      f"{'yes' if t['ended'] else 'no'} |",
                      f"| base | {_cell(b['answer']) or '(empty)'} | {_fmt(b['rouge_l'])} | {_fmt(b['fact_recall'])} | "
                      f"{'yes' if b['ended'] else 'no'} |", ""]
            if t["missing_facts"]:
                lines += [f"Missing facts: {', '.join(t['missing_facts'])}", ""]

    s = metrics.get("speed", {})
    if s:
        lines += ["## Speed", "",
                  f"Device {s.get('device')}: generated tokens/s base {_fmt(s.get('base_tokens_per_s'), 1)}, tuned "
                  f"{_fmt(s.get('tuned_tokens_per_s'), 1)} ({s.get('base_generated_tokens')} + "
                  f"{s.get('tuned_generated_tokens')} tokens). Time: models and generation {s.get('models_s')} s, "
                  f"scoring {s.get('scoring_s')} s, total {s.get('total_s')} s.", ""]
    enc = metrics.get("encoder")
    if enc:
        lines += [f"BERTScore and similarity encoder: `{enc['name']}` (layer {enc['bertscore_layer']} for BERTScore). "
                  "Per-record answers and scores: `predictions.jsonl`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# `dvc plots show` offline: an HTML template that carries Vega itself

VEGA_BUILDS = ("vega/build/vega.min.js", "vega-lite/build/vega-lite.min.js", "vega-embed/build/vega-embed.min.js")
OFFLINE_PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>Pipeline charts</title>
<!-- Vega, Vega-Lite and vega-embed inlined from npm ({versions}): the page loads nothing from a network.
     The page has no placeholder for DVC's own script tags (CDN links), so DVC cannot add them. -->
{inline}
<style>body {{ font-family: sans-serif; }} table {{ border-spacing: 15px; }}</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def offline_html_template(node_modules: str | Path) -> str:
    """The page DVC fills (`dvc plots show --html-template FILE`): the three npm builds inlined, and
    `{plot_divs}` where DVC puts the charts. Raises ConfigError when a build is missing."""
    from .params import ConfigError

    root = Path(node_modules)
    scripts, versions = [], []
    for rel in VEGA_BUILDS:
        path = root / rel
        if not path.is_file():
            raise ConfigError(f"{path} not found: install the charts' scripts first "
                              "(npm install --prefix .cache/vega vega@6.4.0 vega-lite@6.5.0 vega-embed@7.3.0)")
        package = json.loads((root / rel.split("/")[0] / "package.json").read_text(encoding="utf-8"))
        versions.append(f"{package['name']}@{package['version']}")
        code = path.read_text(encoding="utf-8").replace("</script", "<\\/script")
        code = code.split("\n//# sourceMappingURL=")[0]  # no map file next to the page
        scripts.append(f"<script>\n{code}\n</script>")
    return OFFLINE_PAGE.format(versions=", ".join(versions), inline="\n".join(scripts))
