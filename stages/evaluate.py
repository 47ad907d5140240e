"""evaluate stage: base and tuned model side by side on the test split, a report, and the quality gate.

    python -m stages.evaluate --data data/processed --adapter models/adapter --base reports/eval_base \\
        --metrics metrics/eval.json --report reports/eval [--reference main:metrics/eval.json]
    python -m stages.evaluate gate --metrics metrics/eval.json [--reference PATH|REV:PATH]
    python -m stages.evaluate noise --seeds 3      (run-to-run noise of training: see stages/noise.py)
    python -m stages.evaluate plots-template       (an HTML template for `dvc plots show` offline)

The first form reads the base model's answers, scores and validation loss from the evaluate_base
stage's output (reports/eval_base, stages/evaluate_base.py: they do not depend on training, so a
training change does not recompute them), refusing results made for another test split or other
settings; generates greedy answers (batched, left-padded, KV cache) for every test question with the
tuned model, measures its validation perplexity, scores every answer (ROUGE-L, BLEU-4, BERTScore F1,
semantic similarity, exact match, fact recall, length ratio, missing end token; optionally an LLM
judge, for base and tuned answers), and writes
    metrics/eval_summary.json      the DVC metric: a few tuned headline numbers and gate.passed, so that
                                   `dvc metrics show` and `dvc exp show` stay narrow
    metrics/eval.json              everything (git-tracked, not a DVC metric): base / tuned / delta /
                                   test_set / significance / by_category / by_fact_seen / reference / gate
    metrics/eval_records.json      every test record's scores, base and tuned (git-tracked), so that any two
                                   revisions can be compared record by record (paired tests)
    reports/eval/predictions.jsonl one line per test record: question, reference, both answers, scores
    reports/eval/report.md         headline table, per-topic table, worst answers, judge line
    reports/eval/plots/            base.json, tuned.json, by_category.json (DVC plots), metrics.png
`--base ""` computes the base model's results in this run instead (nothing is read or written for them).
The stage itself succeeds when the gate fails (the verdict is in the metrics); the `gate` command
recomputes the verdict from params.yaml and exits 1 with the reasons when it fails, 0 when it passes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from .core import cli, io
from .core.perf import write_perf
from .core.progress import quiet_library_bars
from .core import significance
from .core.gate import RECORDS_NAME, compare, evaluate_gate, likely_causes, load_records, load_reference
from .core.params import EVAL_METRICS, ConfigError, Params, load_params
from .core.records import content_hash
# Shared with the evaluate_base stage (imported here so that `from stages.evaluate import ...` keeps working).
from .evaluate_base import (InputError, ModelRun, all_local, generate_answers, load_base, read_split,  # noqa: F401
                            read_splits, record_id, run_model, score_answers, validation_loss)

STAGE = "evaluate"
DEFAULT_BASE = "reports/eval_base"
RECORD_DIGITS = 4       # per-record scores in eval_records.json; the paired tests use these rounded values
SUMMARY_NAME = "eval_summary.json"
SUMMARY_METRICS = ("rouge_l", "bleu4", "bertscore_f1", "fact_recall")  # the tuned numbers DVC shows


# ---------------------------------------------------------------------------------------------------
# Scoring


def _perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return round(math.exp(loss), 4) if loss < 700 else None  # overflow: JSON has no infinity


def summary(run: ModelRun, idx: list[int], references: list[str]) -> dict:
    from .core.metrics import aggregate

    values = aggregate([run.scores[i] for i in idx], [run.answers[i] for i in idx], [references[i] for i in idx])
    if run.judge is not None:
        judged = [run.judge[i] for i in idx if i < len(run.judge) and run.judge[i] is not None]
        values["judge_score"] = round(sum(judged) / len(judged), 4) if judged else None
    return values


def _delta(tuned: dict, base: dict) -> dict:
    return {k: round(tuned[k] - base[k], 6) for k in EVAL_METRICS
            if isinstance(tuned.get(k), (int, float)) and isinstance(base.get(k), (int, float))
            and math.isfinite(tuned[k]) and math.isfinite(base[k])}


def _group(indices_by_key: dict[str, list[int]], base: ModelRun, tuned: ModelRun, refs, test) -> dict:
    out = {}
    for key in sorted(indices_by_key):
        idx = indices_by_key[key]
        b, t = summary(base, idx, refs), summary(tuned, idx, refs)
        out[key] = {"n": len(idx), "n_with_facts": sum(base.scores[i]["fact_recall"] is not None for i in idx),
                    "base": b, "tuned": t, "delta": _delta(t, b)}
    return out


def build_metrics(test: list[dict], base: ModelRun, tuned: ModelRun, n_val: int) -> dict:
    refs = [r["output"] for r in test]
    everything = list(range(len(test)))
    metrics = {"n_test": len(test), "n_val": n_val,
               "n_with_facts": sum(s["fact_recall"] is not None for s in base.scores)}
    for name, run in (("base", base), ("tuned", tuned)):
        values = summary(run, everything, refs)
        values["val_loss"] = round(run.val_loss, 6) if run.val_loss is not None else None
        values["val_perplexity"] = _perplexity(run.val_loss)
        metrics[name] = values
    metrics["delta"] = _delta(metrics["tuned"], metrics["base"])
    by_category: dict[str, list[int]] = {}
    by_seen: dict[str, list[int]] = {}
    for i, record in enumerate(test):
        by_category.setdefault(str(record.get("category") or "uncategorised"), []).append(i)
        if isinstance(record.get("fact_seen_in_train"), bool):
            by_seen.setdefault("seen" if record["fact_seen_in_train"] else "unseen", []).append(i)
    metrics["by_category"] = _group(by_category, base, tuned, refs, test)
    if by_seen:
        metrics["by_fact_seen"] = _group(by_seen, base, tuned, refs, test)
    return metrics


def _rounded(value):
    return round(value, RECORD_DIGITS) + 0.0 if isinstance(value, float) else value


def record_scores(test: list[dict], base: ModelRun, tuned: ModelRun) -> dict:
    """The per-record file (metrics/eval_records.json): test-set identity and every record's scores,
    sorted by id, rounded to RECORD_DIGITS, so the same answers always give the same bytes."""
    from .core.metrics import RECORD_METRICS

    rows = []
    for i, record in enumerate(test):
        rows.append({"id": record_id(record), "category": record.get("category"),
                     "fact_seen_in_train": record.get("fact_seen_in_train"),
                     "base": {k: _rounded(base.scores[i][k]) for k in RECORD_METRICS},
                     "tuned": {k: _rounded(tuned.scores[i][k]) for k in RECORD_METRICS}})
    rows.sort(key=lambda row: row["id"])
    return {"test_set": {"n": len(test), "hash": content_hash(test)}, "metrics": list(RECORD_METRICS),
            "records": rows}


def records_text(records: dict) -> str:
    """JSON with one record per line: small, stable, and a git diff shows which records changed."""
    head = {k: v for k, v in records.items() if k != "records"}
    lines = [json.dumps(row, ensure_ascii=False, separators=(",", ":")) for row in records["records"]]
    body = ",\n".join(lines)
    return json.dumps(head, ensure_ascii=False)[:-1] + ', "records": [\n' + body + "\n]}\n"


def tuned_vs_base(records: dict) -> dict:
    """Paired tests of tuned against base on every per-record metric (tolerance 0: any significant
    drop is reported as a regression of tuning)."""
    return significance.compare_records(records["records"], records["records"], "tuned", "base")


def summary_metrics(metrics: dict) -> dict:
    """The narrow DVC metric file: a few tuned numbers and the gate verdict."""
    return {"tuned": {k: metrics["tuned"].get(k) for k in SUMMARY_METRICS},
            "gate": {"passed": bool(metrics["gate"]["passed"])}}


def prediction_rows(test: list[dict], base: ModelRun, tuned: ModelRun) -> list[dict]:
    from .core.metrics import degenerate_reason, missing_facts

    rows = []
    for i, record in enumerate(test):
        row = {"id": record_id(record), "category": record.get("category"), "fact_seen_in_train": record.get("fact_seen_in_train"),
               "instruction": record["instruction"], "reference": record["output"]}
        for name, run in (("base", base), ("tuned", tuned)):
            entry = {"answer": run.answers[i], "ended": run.finished[i],
                     "missing_facts": missing_facts(run.answers[i], record["output"]),
                     "degenerate_reason": degenerate_reason(run.answers[i], run.finished[i])}
            entry.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in run.scores[i].items()})
            if run.judge is not None:
                entry["judge_score"] = run.judge[i] if i < len(run.judge) else None
            row[name] = entry
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# The stage


def _load_models(params: Params, adapter_dir: Path):
    from .core.modeling import load_tokenizer

    if not adapter_dir.is_dir():
        raise InputError(f"{adapter_dir} not found (run the train stage first: dvc repro train)")
    manifest_path = adapter_dir / "manifest.json"
    manifest = {}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("method") and manifest["method"] != params.train.method:
            raise ConfigError(f"train.method is '{params.train.method}' but {adapter_dir} holds a "
                              f"'{manifest['method']}' model (re-run the train stage)")
    weights = adapter_dir / ("model" if params.train.method == "full" else "adapter")
    if not weights.is_dir():
        raise InputError(f"{weights} not found: {adapter_dir} is not a train stage output for method "
                        f"'{params.train.method}'")
    tok_dir = adapter_dir / "tokenizer"
    return load_tokenizer(str(tok_dir) if tok_dir.is_dir() else params.model.tokenizer), manifest


def reusable_val_loss(manifest: dict, method: str, val: list[dict], dtype) -> tuple[float | None, str]:
    """(the train stage's validation loss of the saved weights, why) when it is the loss this stage would
    compute: the same val split (content hash), the same method and dtype, and not QLoRA (train measured
    it on a 4-bit base; this stage loads the base in 16 or 32 bits). (None, why not) otherwise."""
    record = manifest.get("validation") or {}
    wanted = {"split_hash": content_hash(val), "method": method, "dtype": str(dtype).removeprefix("torch.")}
    if not record or record.get("loss") is None:
        return None, "computed here (the train stage recorded none)"
    if method == "qlora":
        return None, "computed here (train measured it on the 4-bit base)"
    differs = [f"{key} {record.get(key)!r} vs {value!r}" for key, value in wanted.items() if record.get(key) != value]
    if differs:
        return None, "computed here (train measured another setting: " + "; ".join(differs) + ")"
    return float(record["loss"]), (f"{record['loss']:.6f}, from the train stage (step {record.get('step')}, the "
                                   f"saved weights, the same {len(val)} val records in {wanted['dtype']})")


def evaluate(params: Params, test: list[dict], val: list[dict], adapter_dir: str | Path,
             reference: str | None = None, log=print,
             base_dir: str | Path | None = DEFAULT_BASE) -> tuple[dict, list[dict], dict]:
    """Metrics (dict for metrics/eval.json), per-record predictions and the per-record scores file.
    The base model's results come from `base_dir` (the evaluate_base stage's output, checked against
    these splits and params); base_dir None computes them here. Loads every model once."""
    import gc

    import torch

    from .core import metrics as M
    from .core.determinism import fix_cpu_threads
    from .core.modeling import load_tuned_model, resolve_device, resolve_dtype
    from .evaluate_base import compute_base, with_answer_budget

    started = time.perf_counter()
    adapter_dir = Path(adapter_dir)
    ref = load_reference(reference) if reference else None  # fail on a bad reference before any model work
    tokenizer, training = _load_models(params, adapter_dir)
    params, budget = with_answer_budget(params, tokenizer, test)
    log(f"[evaluate] max_new_tokens {budget.max_new_tokens}: {budget.rule}")
    # stale or missing base results fail here too, before any model work
    base = load_base(base_dir, params, test, val) if base_dir is not None else None
    judge = None
    if params.evaluate.judge.enabled:
        from .core.judge import Judge, config_from_env

        judge = Judge(config_from_env(), params.evaluate.judge.timeout_s)
    device = resolve_device("auto")
    fix_cpu_threads(params.cpu.threads, device)  # the same bytes whatever the core count (determinism.py)
    dtype = resolve_dtype("auto", device)

    semantic = None
    if base is None:
        semantic = M.SemanticScorer(params.evaluate.encoder, params.evaluate.bertscore_layer, device=str(device))
        base = compute_base(params, test, val, tokenizer, device, dtype, semantic, log)
    else:
        log(f"[evaluate] base model: {params.model.base}, answers and scores from {base_dir}")
    log(f"[evaluate] tuned model ({params.train.method}) from {adapter_dir} on {device}; {len(test)} test, "
        f"{len(val)} val records")
    # In fp32 the adapter is merged for generation: the same model up to rounding (package's merge check
    # measures ~1e-6 relative), and on a CPU an unmerged LoRA's extra small matmuls halve the decoding
    # rate (SmolLM2, 2 cores: 66 against 127 tokens/s). In 16-bit a merge rounds the adapter's delta
    # into the weights, so it stays unmerged there.
    model = load_tuned_model(params.model, adapter_dir, params.train.method, dtype=dtype, device=device,
                             tokenizer=tokenizer, merge=dtype == torch.float32)
    known_loss, loss_note = reusable_val_loss(training, params.train.method, val, dtype)
    log(f"[evaluate] tuned validation loss: {loss_note}")
    tuned = run_model(model, tokenizer, test, val, params, device, name="tuned", known_val_loss=known_loss)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    generated = time.perf_counter()

    log(f"[evaluate] scoring with encoder {params.evaluate.encoder}")
    if semantic is None:
        semantic = M.SemanticScorer(params.evaluate.encoder, params.evaluate.bertscore_layer, device=str(device))
    refs = [r["output"] for r in test]
    tuned.scores = score_answers(tuned.answers, refs, tuned.finished, semantic, desc="scoring tuned answers")
    judge_info = {"enabled": False}
    if judge is not None:
        n = min(params.evaluate.judge.max_records, len(test))
        for run in (base, tuned):
            run.judge = judge.score_many([(test[i]["instruction"], refs[i], run.answers[i]) for i in range(n)])
        judge_info = {"enabled": True, "endpoint": judge.config.label, "records": n,
                      "failed_calls": len(judge.failures), "failures": judge.failures[:5]}
    scored = time.perf_counter()

    metrics = build_metrics(test, base, tuned, len(val))
    records = record_scores(test, base, tuned)
    metrics["test_set"] = records["test_set"]
    metrics["significance"] = significance_block(records, params.evaluate.gate.regression_metrics,
                                                 params.evaluate.gate.max_regression)
    metrics["judge"] = judge_info
    metrics["answer_budget"] = {"max_new_tokens": budget.max_new_tokens, "rule": budget.rule,
                                "hit_rate": {"base": metrics["base"]["no_end_token_rate"],
                                             "tuned": metrics["tuned"]["no_end_token_rate"]}}
    # What the answers were generated with, max_new_tokens resolved: package writes it into the model's
    # generation_config.json and serving.json, so the endpoint decodes as evaluated.
    metrics["decoding"] = params.decoding.model_dump(mode="json")
    # the encoder's name, not its path: a path differs between machines and would show in every diff
    metrics["encoder"] = {"name": params.evaluate.encoder, "bertscore_layer": semantic.layer}
    if ref is not None:
        metrics["reference"] = compare(metrics["tuned"], ref, params.evaluate.gate.regression_metrics,
                                       params.evaluate.gate.max_regression, records)
    metrics["gate"] = evaluate_gate(metrics, params.evaluate.gate, metrics.get("reference"))
    metrics["gate"]["likely_causes"] = likely_causes(metrics, training)
    metrics["speed"] = {
        "device": str(device), "batch_size": params.evaluate.batch_size,
        "base_generated_tokens": base.new_tokens, "tuned_generated_tokens": tuned.new_tokens,
        "base_tokens_per_s": round(base.tokens_per_s, 1) if base.generation_s else None,
        "tuned_tokens_per_s": round(tuned.tokens_per_s, 1),
        "generation_s": round(base.generation_s + tuned.generation_s, 2),
        "base_from": str(base_dir) if base_dir is not None else None,
        "models_s": round(generated - started, 2), "scoring_s": round(scored - generated, 2),
        "total_s": round(time.perf_counter() - started, 2),
    }
    return metrics, prediction_rows(test, base, tuned), records


def significance_block(records: dict, gated: list[str] | None = None, tolerance: float | None = None) -> dict:
    """How the intervals were made, the tuned-vs-base tests, the smallest detectable difference, and a
    warning when the test split is too small to detect a drop of the gate's tolerance."""
    tests = tuned_vs_base(records)
    blind = {k: t["mde"] for k, t in tests.items()
             if gated and k in gated and tolerance is not None and t["mde"] is not None and t["mde"] > tolerance}
    warning = None
    if blind:
        warning = (f"the test split ({records['test_set']['n']} records) is too small to detect a drop of "
                   f"{tolerance:g} (evaluate.gate.max_regression) on "
                   + ", ".join(f"{k} (detectable: {v:.3f})" for k, v in blind.items())
                   + "; such drops will read as within noise. Add test records (docs/evaluation.md).")
    return {"method": f"paired bootstrap 95% CI ({significance.RESAMPLES} resamples, percentile) and paired "
                      f"permutation test, seed {significance.SEED}; significant when p < {significance.ALPHA} and "
                      "the CI excludes 0; bleu4 tested on sentence BLEU",
            "detectable_difference": {k: t["mde"] for k, t in tests.items()},
            "warning": warning,
            "tuned_vs_base": tests}


def write_outputs(metrics: dict, predictions: list[dict], metrics_path: str | Path, report_dir: str | Path,
                  worst_answers: int, records: dict | None = None, records_path: str | Path | None = None,
                  summary_path: str | Path | None = None) -> None:
    """reports/eval (predictions, report, plots) replaced as a whole, then the per-record scores,
    the metrics file and the summary (the DVC metric) last."""
    from .core.report import render_report, write_plots

    with io.atomic_dir(report_dir) as tmp:
        (tmp / "predictions.jsonl").write_text(io.jsonl_text(predictions), encoding="utf-8")
        plots = write_plots(metrics, tmp / "plots")
        (tmp / "report.md").write_text(render_report(metrics, predictions, worst_answers, plots), encoding="utf-8")
    if records is not None:
        io.write_text_atomic(records_path or Path(metrics_path).with_name(RECORDS_NAME), records_text(records))
    io.write_json(metrics_path, metrics)
    if summary_path:
        io.write_json(summary_path, summary_metrics(metrics))


def _print_gate(gate: dict, out=sys.stdout) -> None:
    if gate["passed"]:
        print(f"quality gate: PASSED ({len(gate['checks'])} checks)", file=out)
    else:
        print(f"quality gate: FAILED ({len(gate['reasons'])} of {len(gate['checks'])} checks)", file=out)
        for reason in gate["reasons"]:
            print(f"  - {reason}", file=out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "gate":
        return cli.run(lambda: gate_main(argv[1:]), f"{STAGE} gate")
    if argv and argv[0] == "plots-template":
        return cli.run(lambda: plots_template_main(argv[1:]), f"{STAGE} plots-template")
    if argv and argv[0] == "noise":
        from .noise import main as noise_main

        return cli.run(lambda: noise_main(argv[1:]), f"{STAGE} noise")
    return cli.run(lambda: stage_main(argv), STAGE)


def stage_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/processed", help="folder with test.jsonl and val.jsonl")
    parser.add_argument("--adapter", default="models/adapter", help="train stage output folder")
    parser.add_argument("--base", default=DEFAULT_BASE,
                        help="the evaluate_base stage's output (the base model's answers, scores and val loss); "
                             "'' = compute them in this run")
    parser.add_argument("--metrics", default="metrics/eval.json")
    parser.add_argument("--records", default=None, help=f"per-record scores (default: {RECORDS_NAME} beside --metrics)")
    parser.add_argument("--summary", default=None,
                        help=f"the narrow DVC metric file (default: {SUMMARY_NAME} beside --metrics; '' = none)")
    parser.add_argument("--report", default="reports/eval", help="folder for predictions, report and plots")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--reference", default=None,
                        help="metrics file to compare with: PATH or REV:PATH (default: evaluate.reference)")
    parser.add_argument("--base-model", default="", help=cli.BASE_MODEL_HELP)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cli.use_base_model(args.base_model, params.model)
    quiet_library_bars()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if all_local(params):  # nothing to download: never let a library try the hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    test, val = read_splits(args.data)
    reference = args.reference if args.reference is not None else params.evaluate.reference
    metrics, predictions, records = evaluate(params, test, val, args.adapter, reference or None,
                                             base_dir=args.base or None)
    # Timings vary by machine and load: logs/perf/evaluate.json, not eval.json or the (cached) report,
    # so that the same inputs give the same bytes (stages/core/perf.py).
    speed = metrics.pop("speed")
    write_perf(STAGE, speed)
    summary = str(Path(args.metrics).with_name(SUMMARY_NAME)) if args.summary is None else args.summary
    write_outputs(metrics, predictions, args.metrics, args.report, params.evaluate.worst_answers, records,
                  args.records, summary or None)
    b, t, s = metrics["base"], metrics["tuned"], speed
    print(f"[evaluate] ROUGE-L base {b['rouge_l']:.3f} -> tuned {t['rouge_l']:.3f}; "
          f"BLEU-4 {b['bleu4']:.3f} -> {t['bleu4']:.3f}; fact recall {b['fact_recall'] or 0:.3f} -> "
          f"{t['fact_recall'] or 0:.3f}; {s['tuned_tokens_per_s']:.0f} generated tokens/s (tuned); "
          f"{s['total_s']:.1f} s")
    _print_gate(metrics["gate"])
    print(f"[evaluate] wrote {args.metrics}, {args.records or Path(args.metrics).with_name(RECORDS_NAME)}"
          + (f", {summary}" if summary else "") + f" and {args.report}/ (report.md, predictions.jsonl, plots/)")
    return 0


def gate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate gate",
                                     description="Recompute the quality gate; exit 1 with the reasons when it fails.")
    parser.add_argument("--metrics", default="metrics/eval.json")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--reference", default=None,
                        help="PATH or REV:PATH of the metrics to compare with (default: evaluate.reference, "
                             "else the reference recorded in the metrics file)")
    parser.add_argument("--records", default=None, help=f"per-record scores (default: {RECORDS_NAME} beside --metrics)")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    path = Path(args.metrics)
    metrics = io.read_json(path, missing=" (run the evaluate stage first: dvc repro publish_eval)")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("tuned"), dict):
        raise ConfigError(f"{path} has no 'tuned' metrics: is it an evaluate stage output?")
    spec = args.reference if args.reference is not None else params.evaluate.reference
    gate_params = params.evaluate.gate
    if spec:
        records = load_records(args.records or str(path.with_name(RECORDS_NAME)))
        comparison = compare(metrics["tuned"], load_reference(spec), gate_params.regression_metrics,
                             gate_params.max_regression, records, (metrics.get("test_set") or {}).get("hash"))
    else:
        comparison = metrics.get("reference")
    gate = evaluate_gate(metrics, gate_params, comparison)
    if args.json:
        print(json.dumps(gate, indent=2))
    else:
        if comparison:
            print(f"compared with {comparison['source']}: " + ", ".join(
                f"{k} {v:+.4f}" for k, v in comparison["delta"].items() if k in gate_params.regression_metrics))
            for name, test in (comparison.get("significance") or {}).items():
                if name in gate_params.regression_metrics:
                    print(f"  {name}: {test['verdict']}, {significance.describe(name, test)}")
        for note in gate.get("notes") or []:
            print(f"note: {note}")
        _print_gate(gate, sys.stdout if gate["passed"] else sys.stderr)
    return 0 if gate["passed"] else 1


def plots_template_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stages.evaluate plots-template",
        description="Write an HTML template for `dvc plots show --html-template` with Vega inlined (works offline).")
    parser.add_argument("--node-modules", default=".cache/vega/node_modules",
                        help="where npm installed vega, vega-lite and vega-embed")
    parser.add_argument("--out", default=".cache/vega/plots.html")
    args = parser.parse_args(argv)
    from .core.report import offline_html_template

    io.write_text_atomic(args.out, offline_html_template(args.node_modules))
    print(f"wrote {args.out}: dvc plots show --html-template {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
