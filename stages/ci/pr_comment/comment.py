"""The whole comment: every section in order, cut to GitHub's size limit; and the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .answers import answers_section, changed_answers, parse_predictions
from .charts import charts_section, read_curves, render_pngs
from .common import MARKER, MAX_COMMENT_CHARS, _cell, _load_json, _run, changed_files, dvc, read_at_rev, resolve_base
from .estimate import compute_estimate, estimate_section, training_paths
from .evaluation import _eval_comparison, _noise_floor, apply_eval_flags, evaluation_section
from .gate import gate_section
from .metrics import DIFF_TARGETS, metric_rows, metrics_section
from .params import _gate_params, params_section
from .plan import plan_section
from .proxy import build_proxy_section


@dataclass
class Inputs:
    base_label: str
    head_label: str
    gate_md: str
    metrics_md: str
    params_md: str
    charts_md: str
    answers_md: str
    estimate_md: str
    notes: list[str] = field(default_factory=list)
    eval_md: str = ""
    plan_md: str = ""   # "What CI ran" (stages.ci.plan); empty when the comment was built without a plan
    proxy_md: str = ""  # the proxy verdict (stages.ci.proxy); empty when no proxy ran


def build_comment(inp: Inputs) -> str:
    head = [MARKER, f"## 🦙 Pipeline report: `{inp.head_label}` vs `{inp.base_label}`"]
    if inp.notes:
        head += [""] + [f"> {_cell(n)}" for n in inp.notes]
    parts = ["\n".join(head), inp.plan_md, inp.gate_md, inp.eval_md, inp.proxy_md, inp.metrics_md, inp.params_md, inp.charts_md, inp.answers_md,
             inp.estimate_md,
             "<sub>Built by <code>python -m stages.ci.pr_comment</code>; updated on every push.</sub>"]
    text = "\n\n".join(p for p in parts if p) + "\n"
    note = "\n\n_(section cut: the comment reached GitHub's size limit)_"
    while len(text) > MAX_COMMENT_CHARS:  # cut the longest section until the comment fits
        i = max(range(1, len(parts) - 1), key=lambda k: len(parts[k]))
        excess = len(text) - MAX_COMMENT_CHARS
        if len(parts[i]) <= 200 + len(note):
            text = text[:MAX_COMMENT_CHARS]
            break
        parts[i] = parts[i][: max(200, len(parts[i]) - excess - len(note) - 1)] + note
        text = "\n\n".join(p for p in parts if p) + "\n"
    return text


def make_comment(args) -> tuple[str, list[Path]]:
    cwd = Path(args.repo)
    base = resolve_base(args.base, cwd)
    base_label = args.base if base is None else base
    ok, head = _run(["git", "rev-parse", "--short", "HEAD"], cwd)
    head_label = args.head_label or (head if ok else "workspace")
    notes = list(args.note or [])
    regression_metrics, tolerance = _gate_params(cwd / args.params)

    plan, plan_problem = _load_json(cwd / args.plan) if args.plan else (None, None)
    not_started = set(plan.get("not_started") or []) if isinstance(plan, dict) else set()
    eval_metrics, eval_problem = _load_json(cwd / args.metrics)
    if "evaluate" in not_started:
        # The committed metrics/eval.json is the base branch's, measured for another configuration: no
        # verdict, comparison or chart of this change may come from it.
        eval_metrics, eval_problem = None, (f"evaluate was not started here (What CI ran says why); "
                                            f"{args.metrics} is the committed one, not this configuration's")
    gate_md = gate_section(eval_metrics, eval_problem)
    comparison, eval_md = None, ""
    if base is not None:
        comparison, why = _eval_comparison(cwd, base, base_label, args.metrics, eval_metrics, regression_metrics,
                                           tolerance)
        eval_md = evaluation_section(comparison, eval_metrics, _noise_floor(cwd, base), base_label,
                                     eval_problem if "evaluate" in not_started else why or eval_problem)

    if base is None:
        missing = f"base revision '{args.base}' not found (fetch it: git fetch origin {args.base})"
        metrics_md = metrics_section([], base_label, None, missing)
        params_md = params_section(None, base_label, missing)
    elif args.no_dvc:
        metrics_md = metrics_section([], base_label, None, "skipped (--no-dvc)")
        params_md = params_section(None, base_label, "skipped (--no-dvc)")
    else:
        # The stages' detail files are git-tracked outputs, not DVC metrics (so that `dvc metrics show`
        # stays a one-screen headline): name them as targets to diff them too.
        targets = ["--targets", *[t for t in DIFF_TARGETS if (cwd / t).is_file()]]
        ok_j, out_j = dvc(["metrics", "diff", base, "--json", *targets], cwd)
        ok_m, out_m = dvc(["metrics", "diff", base, "--md", *targets], cwd)
        rows = []
        if ok_j:
            try:
                rows = metric_rows(json.loads(out_j or "{}"), regression_metrics, tolerance, _noise_floor(cwd, base))
            except json.JSONDecodeError:
                ok_j, out_j = False, "unreadable JSON from dvc metrics diff"
        apply_eval_flags(rows, comparison, tolerance)
        metrics_md = metrics_section(rows, base_label, out_m if ok_m else None, None if ok_j else out_j)
        ok_p, out_p = dvc(["params", "diff", base, "--md"], cwd)
        params_md = params_section(out_p if ok_p else None, base_label, None if ok_p else out_p)

    curves = read_curves(cwd / args.live) if "train" not in not_started else {}
    pngs: list[Path] = []
    if args.plots_dir:
        try:
            pngs = render_pngs(curves, eval_metrics, cwd / args.plots_dir)
        except Exception as exc:  # noqa: BLE001 - charts are optional
            notes.append(f"PNG charts not rendered: {type(exc).__name__}: {exc}")
    artifact_note = None
    if os.environ.get("GITHUB_RUN_ID") and os.environ.get("GITHUB_REPOSITORY"):
        server = os.environ.get("GITHUB_SERVER_URL", "https://github.com")
        artifact_note = (f"artifact `{args.artifact_name}` of [this workflow run]({server}/"
                         f"{os.environ['GITHUB_REPOSITORY']}/actions/runs/{os.environ['GITHUB_RUN_ID']})")
    charts_md = charts_section(curves, eval_metrics, pngs, args.image_base_url, artifact_note)

    pred_text = None
    pred_path = cwd / args.predictions
    if pred_path.is_file():
        try:
            pred_text = pred_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            notes.append(f"{args.predictions} unreadable: {exc}")
    rows, bad = parse_predictions(pred_text)
    old_rows = None
    if rows and base is not None and not args.no_dvc:
        old_text = read_at_rev(base, args.predictions, cwd)
        old_rows = parse_predictions(old_text)[0] if old_text else None
    changes = changed_answers(rows, old_rows, args.max_answers)
    source = ("tuned answers that differ from the base branch's" if old_rows
              else "where the tuned model answers differently from the base model"
              + ("" if base is None else f" (`{base_label}`'s predictions are not in the DVC cache)"))
    answers_md = answers_section(changes, len(rows), bad, source)

    files = changed_files(base, cwd) if base else None
    if args.no_estimate:
        est, est_error = None, "skipped (--no-estimate)"
    else:
        est, est_error = compute_estimate(cwd / args.params)
    estimate_md = estimate_section(est, est_error, training_paths(files))

    plan_md = plan_section(plan, plan_problem) if args.plan else ""
    proxy_md = build_proxy_section(cwd / args.proxy, base_label) if args.proxy else ""

    comment = build_comment(Inputs(base_label, head_label, gate_md, metrics_md, params_md, charts_md,
                                   answers_md, estimate_md, notes, eval_md, plan_md, proxy_md))
    return comment, pngs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ci.pr_comment", description=sys.modules[__package__].__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="branch or revision to compare with (origin/<base> also tried)")
    parser.add_argument("--out", default="-", help="file to write the comment to ('-' = stdout)")
    parser.add_argument("--repo", default=".", help="repository root")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics", default="metrics/eval.json")
    parser.add_argument("--predictions", default="reports/eval/predictions.jsonl")
    parser.add_argument("--live", default="dvclive/train", help="dvclive folder of the train stage")
    parser.add_argument("--plots-dir", default="build/pr-comment", help="where PNG charts go ('' = none)")
    parser.add_argument("--image-base-url", default=None, help="URL where the PNGs are published (embeds them)")
    parser.add_argument("--artifact-name", default="pr-charts", help="name of the workflow artifact with the PNGs")
    parser.add_argument("--max-answers", type=int, default=5)
    parser.add_argument("--head-label", default=None, help="label of this change (default: short HEAD sha)")
    parser.add_argument("--note", action="append", help="a line to show at the top (repeatable), e.g. what CI skipped")
    parser.add_argument("--plan", default=None,
                        help="JSON of python -m stages.ci.plan: adds the 'What CI ran' section")
    parser.add_argument("--proxy", default=None, metavar="DIR",
                        help="build folder of python -m stages.ci.proxy (proxy.json, base/, head/): adds the proxy verdict")
    parser.add_argument("--no-dvc", action="store_true", help="skip the dvc diff calls")
    parser.add_argument("--no-estimate", action="store_true", help="skip the Azure time and cost estimate")
    args = parser.parse_args(argv)
    comment, pngs = make_comment(args)
    if args.out == "-":
        sys.stdout.write(comment)
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(comment, encoding="utf-8")
        tmp.replace(out)
        print(f"[pr_comment] wrote {out} ({len(comment):,} characters)"
              + (f" and {len(pngs)} chart(s) in {pngs[0].parent}" if pngs else ""), file=sys.stderr)
    return 0

