"""The pull-request comment builder (stages/ci/pr_comment.py) on crafted inputs, and end to end on
a throw-away git + DVC repository with a base branch and a change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.ci import pr_comment as pc

ROOT = Path(__file__).resolve().parents[1]

ESTIMATE = {"tokens_per_epoch": 60527, "expected_tokens_per_s": 41234.5, "hours": 0.0234, "cost_usd": 0.14,
            "vm_size": "Standard_NC40ads_H100_v5", "nodes": 1,
            "throughput_basis": "assumed MFU 30% of H100-NVL bf16 peak",
            "memory": {"total_gb": 12.3, "gpu_memory_gb": 94.0, "fits": True}}
GATED = ("rouge_l", "bleu4", "bertscore_f1", "semantic_similarity", "fact_recall")


# ---------------------------------------------------------------------------------------------
# metrics diff and regression flags


def test_regressions_are_flagged_by_direction_and_tolerance():
    diff = {"metrics/eval.json": {
        "tuned.rouge_l": {"old": 0.80, "new": 0.70, "diff": -0.10},          # gated, beyond 0.02
        "tuned.bleu4": {"old": 0.500, "new": 0.490, "diff": -0.01},         # gated, within tolerance
        "tuned.val_loss": {"old": 1.0, "new": 1.5, "diff": 0.5},            # lower is better: worse
        "tuned.no_end_token_rate": {"old": 0.2, "new": 0.1, "diff": -0.1},  # lower is better: better
        "base.rouge_l": {"old": 0.3, "new": 0.1, "diff": -0.2},             # base model: never a regression
        "speed.total_s": {"old": 10.0, "new": 30.0, "diff": 20.0},          # times: no judgement
        "tuned.semantic_similarity": {"old": None, "new": 0.7},             # new metric
        "gate.passed": {"old": True, "new": False, "diff": -1},
    }}
    rows = {r.name: r for r in pc.metric_rows(diff, GATED, 0.02)}
    assert rows["tuned.rouge_l"].regression and rows["tuned.rouge_l"].flag.startswith("❌ regression")
    assert not rows["tuned.bleu4"].regression and rows["tuned.bleu4"].flag == "⚠️ worse"
    assert rows["tuned.val_loss"].flag == "⚠️ worse" and not rows["tuned.val_loss"].regression
    assert rows["tuned.no_end_token_rate"].flag == "✅ better"
    assert rows["base.rouge_l"].flag == "⚠️ worse" and not rows["base.rouge_l"].regression
    assert rows["speed.total_s"].flag == ""
    assert rows["tuned.semantic_similarity"].flag == "🆕 new"
    assert rows["gate.passed"].regression and rows["gate.passed"].flag == "❌ gate fails"
    assert sorted(r.name for r in rows.values() if r.regression) == ["gate.passed", "tuned.rouge_l"]


def test_a_loss_change_within_the_seed_noise_or_the_tolerance_is_noise_not_better():
    """The same commit on an AMD and an Intel CPU moved final_val_loss by -0.0015 (issue 23): noise."""
    noise = {"metrics": {"val_loss": {"sd": 0.02}}}
    diff = {"metrics/train.json": {
        "final_val_loss": {"old": 3.927154, "new": 3.925654},       # -0.0015: within the seed sd 0.02
        "final_train_loss": {"old": 3.635443, "new": 3.634541},     # within noise too
        "best_val_loss": {"old": 3.9, "new": 3.85},                  # -0.05: beyond 0.02, better
        "final_val_perplexity": {"old": 50.76, "new": 50.68},        # exp: -0.16% of 50.76, within 2% (e^0.02-1)
        "final_val_perplexity_big": {"old": 50.0, "new": 45.0},      # -10%: better
    }}
    rows = {r.name: r for r in pc.metric_rows(diff, GATED, 0.02, noise)}
    assert rows["final_val_loss"].flag == "within noise" and not rows["final_val_loss"].regression
    assert rows["final_train_loss"].flag == "within noise"
    assert rows["best_val_loss"].flag == "✅ better"
    assert rows["final_val_perplexity"].flag == "within noise"
    assert rows["final_val_perplexity_big"].flag == "✅ better"
    # without a noise floor, the stated tolerance (0.5% of the value) decides
    rows = {r.name: r for r in pc.metric_rows(diff, GATED, 0.02, None)}
    assert rows["final_val_loss"].flag == "within noise"                       # 0.0015 < 0.0196
    assert rows["best_val_loss"].flag == "✅ better"                          # 0.05 > 0.0195
    worse = pc.metric_rows({"m.json": {"final_val_loss": {"old": 3.9, "new": 3.95}}}, GATED, 0.02, None)
    assert worse[0].flag == "⚠️ worse"


def test_a_noise_floor_applies_only_to_the_model_it_was_measured_for(tmp_path):
    assert pc.noise_applies({"model": "smollm2-135m", "metrics": {}}, "smollm2-135m")
    assert not pc.noise_applies({"model": "embedded", "metrics": {}}, "smollm2-135m")
    assert pc.noise_applies({"metrics": {}}, "embedded")          # written before the key: the embedded model
    assert not pc.noise_applies({"metrics": {}}, "smollm2-135m") and not pc.noise_applies(None, "embedded")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/noise_floor.json").write_text('{"model": "embedded", "metrics": {"val_loss": {"sd": 0.07}}}')
    (tmp_path / "params.yaml").write_text("model:\n  base: smollm2-135m\n")
    assert pc._noise_floor(tmp_path, "HEAD") is None
    (tmp_path / "params.yaml").write_text("model:\n  base: embedded\n")
    assert pc._noise_floor(tmp_path, "HEAD")["metrics"]["val_loss"]["sd"] == 0.07


def test_new_removed_and_changed_non_numeric_metrics():
    diff = {"metrics/deploy.json": {
        "url": {"old": None, "new": "http://127.0.0.1:5001/score"},
        "server": {"old": "azmlinfsrv 1.5.0", "new": None},
        "model.method": {"old": "lora", "new": "qlora"},
        "early_stopped": {"old": False, "new": True},
        "smoke.passed": {"old": None, "new": True},
    }}
    rows = {r.name: r for r in pc.metric_rows(diff, GATED, 0.02)}
    assert rows["url"].flag == "🆕 new" and rows["server"].flag == "removed"
    assert rows["model.method"].flag == "changed" and rows["early_stopped"].flag == "changed"
    assert not any(r.regression for r in rows.values())
    assert pc._fmt(False, "early_stopped") == "no" and pc._fmt(True, "smoke.passed") == "pass"
    # the merge check: a smaller logit difference is better; the logits' magnitude gets no judgement
    assert pc.metric_direction("merge_check.relative_logit_diff") == -1
    assert pc.metric_direction("merge_check.max_abs_logit") == 0
    assert pc.metric_direction("merge_check.logits_tolerance") == 0


def test_full_diff_table_is_compacted_and_drops_per_topic_deltas():
    raw = "\n".join([
        "| Path               | Metric                              | main    | workspace   | Change   |",
        "|--------------------|-------------------------------------|---------|-------------|----------|",
        "| metrics/eval.json  | by_category.leave.delta.rouge_l     | 0.1     | 0.2         | 0.1      |",
        "| metrics/eval.json  | by_category.leave.tuned.rouge_l     | 0.1     | 0.2         | 0.1      |",
        "| metrics/eval.json  | tuned.rouge_l                       | 0.1     | 0.2         | 0.1      |",
    ])
    table, dropped = pc.compact_diff_table(raw)
    assert dropped == 1
    assert table.splitlines() == [
        "| Path | Metric | main | workspace | Change |",
        "|---|---|---|---|---|",
        "| metrics/eval.json | by_category.leave.tuned.rouge_l | 0.1 | 0.2 | 0.1 |",
        "| metrics/eval.json | tuned.rouge_l | 0.1 | 0.2 | 0.1 |",
    ]


def test_metric_rows_tolerate_malformed_diffs():
    assert pc.metric_rows(None) == [] and pc.metric_rows({"a.json": "oops"}) == []
    rows = pc.metric_rows({"a.json": {"x": "not a dict", "loss": {"old": "n/a", "new": 1.0}}})
    assert [r.name for r in rows] == ["loss"] and not rows[0].regression


def test_metrics_section_headline_and_full_table():
    diff = {"metrics/eval.json": {
        "tuned.rouge_l": {"old": 0.8, "new": 0.7},
        "by_category.hr.tuned.rouge_l": {"old": 0.9, "new": 0.1},
        "gate.passed": {"old": True, "new": True}},
        "metrics/train.json": {"final_train_loss": {"old": 2.0, "new": 1.0}}}
    rows = pc.metric_rows(diff, GATED, 0.02)
    raw = "| Path | Metric | main | workspace | Change |\n|---|---|---|---|---|\n| metrics/eval.json | tuned.rouge_l | 0.8 | 0.7 | -0.1 |"
    md = pc.metrics_section(rows, "origin/main", raw, None)
    assert "**1 regression(s):** `tuned.rouge_l`" in md
    assert "| metrics/eval.json | `tuned.rouge_l` | 0.8 | 0.7 | -0.1 | ❌ regression (> 0.02) |" in md
    assert "| metrics/train.json | `final_train_loss` | 2 | 1 | -1 | ✅ better |" in md
    assert "`by_category.hr.tuned.rouge_l`" not in md.split("<details>")[0]  # only in the folded table
    assert "1 more metric(s) changed" in md
    assert "<summary><code>dvc metrics diff origin/main --md</code></summary>" in md
    empty = pc.metrics_section([], "main", "| Path | Metric |\n|---|---|", None)
    assert "No metric differs" in empty and "<details>" not in empty
    assert "dvc metrics diff` failed: boom" in pc.metrics_section([], "main", None, "boom")


def test_params_section():
    md = "| Path | Param | main | workspace |\n|---|---|---|---|\n| params.yaml | train.lora.r | 32 | 16 |"
    assert "train.lora.r" in pc.params_section(md, "main", None)
    assert "No parameter changed." in pc.params_section("| Path | Param |\n|---|---|\n", "main", None)
    assert "failed: ERROR: unknown revision" in pc.params_section(None, "main", "ERROR: unknown revision")


# ---------------------------------------------------------------------------------------------
# gate verdict


def test_gate_section_passed_failed_missing():
    ok = pc.gate_section({"gate": {"passed": True, "reasons": [], "checks": [{}] * 5}})
    assert "✅ **Passed** (5 checks)" in ok
    bad = pc.gate_section({"gate": {"passed": False, "checks": [{}] * 5, "reference": "main:metrics/eval.json",
                                    "reasons": ["tuned rouge_l 0.2100 < minimum 0.3", "<b>html</b> | pipe"]}})
    assert "❌ **Failed** (2 of 5 checks)" in bad and "- tuned rouge_l 0.2100 &lt; minimum 0.3" in bad
    assert "&lt;b&gt;html&lt;/b&gt; \\| pipe" in bad and "main:metrics/eval.json" in bad
    assert "Not evaluated" in pc.gate_section(None, "metrics/eval.json not found")
    assert "metrics/eval.json not found" in pc.gate_section(None, "metrics/eval.json not found")
    assert "Not evaluated" in pc.gate_section({"gate": {"passed": "yes"}})
    assert "Not evaluated" in pc.gate_section({"tuned": {}})


# ---------------------------------------------------------------------------------------------
# answers


def _row(q, ref, base, tuned, b=None, t=None):
    return {"instruction": q, "reference": ref, "base": {"answer": base, "rouge_l": b},
            "tuned": {"answer": tuned, "rouge_l": t}}


def test_parse_predictions_is_defensive():
    text = "\n".join([json.dumps(_row("q1", "r", "b", "t")), "not json", json.dumps([1, 2]),
                      json.dumps({"no": "instruction"}), "",
                      json.dumps({"instruction": "q2", "base_answer": "flat b", "tuned_answer": "flat t"})])
    rows, bad = pc.parse_predictions(text)
    assert [r["instruction"] for r in rows] == ["q1", "q2"] and bad == 3
    assert pc.answer_of(rows[1], "tuned") == "flat t" and pc.answer_of(rows[0], "base") == "b"
    assert pc.answer_of({"instruction": "x", "tuned": {"answer": 3}}, "tuned") is None
    assert pc.parse_predictions(None) == ([], 0)


def test_changed_answers_against_the_base_branch():
    now = [_row("q1", "r1", "b1", "same"), _row("q2", "r2", "b2", "new answer"), _row("q3", "r3", "b3", "x")]
    before = [_row("q1", "r1", "b1", "same"), _row("q2", "r2", "b2", "old answer")]
    changes = pc.changed_answers(now, before, limit=5)
    assert [(c.instruction, c.before, c.tuned) for c in changes] == [("q2", "old answer", "new answer")]


def test_changed_answers_without_base_branch_shows_gains_and_a_loss():
    rows = [_row(f"q{i}", "r", "b", "t" if i != 3 else "b", b=0.1, t=0.1 + i / 10) for i in range(8)]
    rows.append(_row("worse", "r", "b", "t", b=0.9, t=0.2))
    changes = pc.changed_answers(rows, None, limit=4)
    assert len(changes) == 4
    assert changes[0].instruction == "q7" and "ROUGE-L 0.10 → 0.80" in changes[0].note
    assert changes[-1].instruction == "worse" and "worse than base" in changes[-1].note
    assert all(c.instruction != "q3" for c in changes)  # tuned == base: not a change
    assert pc.changed_answers(rows, None, limit=0) == []


def test_answers_section_escapes_untrusted_model_output():
    change = pc.AnswerChange("How do I <script>?", "ref", "@admin please", "a | b\nline2" + "x" * 600, "before")
    md = pc.answers_section([change], total=10, bad_lines=1, source_note="crafted")
    assert "&lt;script&gt;" in md and "<script>" not in md
    assert "@\u200badmin" in md                      # no @mention pings
    assert "line2" in md and "\nline2" not in md     # one line per answer
    assert "…" in md                                  # long answers cut
    assert "**tuned, base branch:** before" in md and "1 unreadable line(s) skipped" in md
    assert "missing or empty" in pc.answers_section([], 0, 0, "")


# ---------------------------------------------------------------------------------------------
# estimate


def test_estimate_section_uses_the_estimate_contract():
    md = pc.estimate_section(ESTIMATE, None, ["params.yaml", "stages/train.py"])
    assert "**triggers training**" in md and "`params.yaml`, `stages/train.py`" in md
    assert "| VM | 1 × `Standard_NC40ads_H100_v5` |" in md
    assert "| tokens per epoch | 60,527 |" in md and "41,234" in md or "4.123e+04" in md
    assert "| time | 1.4 min |" in md and "| cost | $0.14 |" in md
    assert "12.3 GiB of 94.0 GiB (fits)" in md
    none = pc.estimate_section({**ESTIMATE, "cost_usd": None, "hours": 3.75, "nodes": 2}, None, [])
    assert "triggers **no training**" in none and "| time | 3 h 45 min |" in none
    assert "unknown (no price for this VM size)" in none and "2 × " in none
    assert "Estimate unavailable: ConfigError: no data" in pc.estimate_section(None, "ConfigError: no data", None)


def test_training_paths_follow_train_yml():
    assert pc.training_paths(["README.md", "docs/x.md", "infra/main.bicep"]) == []
    assert pc.training_paths(["params.yaml", "data/raw/a.jsonl", "stages/ci/x.py", "dvc.yaml", "dvc.lock"]) == \
        ["params.yaml", "data/raw/a.jsonl", "stages/ci/x.py", "dvc.yaml"]
    assert pc.training_paths(None) is None


def test_compute_estimate_reports_errors_instead_of_raising(tmp_path):
    est, err = pc.compute_estimate(tmp_path / "missing.yaml")
    assert est is None and err and "missing.yaml" in err


# ---------------------------------------------------------------------------------------------
# charts


def _dvclive(root: Path, series: dict[str, list[tuple[int, float]]]) -> Path:
    live = root / "dvclive" / "train"
    for name, points in series.items():
        tsv = live / "plots" / "metrics" / f"{name}.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        leaf = name.split("/")[-1]
        tsv.write_text("timestamp\tstep\t" + leaf + "\n" + "".join(f"1700000000\t{s}\t{v}\n" for s, v in points))
    return live


def test_curves_and_mermaid_charts(tmp_path):
    live = _dvclive(tmp_path, {"train/loss": [(i, 10 - i / 20) for i in range(100)], "val/loss": [(50, 8.0), (99, 7.0)]})
    (live / "plots" / "metrics" / "broken.tsv").write_text("step\tx\nnot-a-number\tfoo\n")
    curves = pc.read_curves(live)
    assert set(curves) == {"train/loss", "val/loss"} and len(curves["train/loss"]) == 100
    chart = pc.mermaid_curve("train/loss", curves["train/loss"])
    lines = chart.splitlines()
    assert lines[0] == "```mermaid" and lines[1] == "xychart-beta" and lines[-1] == "```"
    labels = lines[3][len("  x-axis ["):-1].split(", ")
    values = lines[5][len("  line ["):-1].split(", ")
    assert len(labels) == len(values) == 40 and labels[0] == '"0"' and labels[-1] == '"99"'
    metrics = {"base": {"rouge_l": 0.1, "bleu4": 0.05}, "tuned": {"rouge_l": 0.8, "bleu4": 0.6, "fact_recall": 0.9}}
    bars = pc.mermaid_metrics(metrics)
    assert 'x-axis ["rouge_l", "bleu4"]' in bars and "bar [0.8, 0.6]" in bars and "line [0.1, 0.05]" in bars
    assert pc.mermaid_metrics({"base": None}) is None and pc.read_curves(tmp_path / "nowhere") == {}


def test_png_charts_are_real_images(tmp_path):
    live = _dvclive(tmp_path, {"train/loss": [(i, 5.0 - i / 10) for i in range(20)]})
    pngs = pc.render_pngs(pc.read_curves(live), {"base": {"rouge_l": 0.1}, "tuned": {"rouge_l": 0.7}}, tmp_path / "out")
    assert [p.name for p in pngs] == ["loss.png", "metrics.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    section = pc.charts_section(pc.read_curves(live), None, pngs, None, "artifact `pr-charts`")
    assert "```mermaid" in section and "artifact `pr-charts`" in section and "![" not in section
    embedded = pc.charts_section({}, {"base": {"rouge_l": 0.1}, "tuned": {"rouge_l": 0.7}}, pngs, "https://h/x/", None)
    assert "![loss](https://h/x/loss.png)" in embedded


# ---------------------------------------------------------------------------------------------
# the whole comment


def test_comment_starts_with_marker_and_fits_github_limit():
    inp = pc.Inputs("main", "abc1234", "G", "M" * 50_000, "P" * 30_000, "C", "A" * 20_000, "E", ["note"])
    text = pc.build_comment(inp)
    assert text.splitlines()[0] == pc.MARKER
    assert len(text) <= pc.MAX_COMMENT_CHARS and "size limit" in text
    assert "> note" in text and "\nG\n" in text and "\nE\n" in text


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def _run_comment(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GITHUB_RUN_ID": "", "GITHUB_REPOSITORY": ""}
    return subprocess.run([sys.executable, "-m", "stages.ci.pr_comment", *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=180)


@pytest.fixture(scope="module")
def pr_repo(module_dir) -> Path:
    """main: params + metrics + predictions; branch `feature`: a params change that regresses ROUGE-L
    and fails the gate, new predictions and training curves."""
    repo = module_dir("pr") / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "ci@example.invalid")
    _git(repo, "config", "user.name", "ci")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    (repo / "params.yaml").write_text("train:\n  lora:\n    r: 32\n  learning_rate: 0.003\n"
                                      "evaluate:\n  gate:\n    max_regression: 0.02\n    regression_metrics: [rouge_l]\n")
    (repo / "dvc.yaml").write_text("stages:\n  evaluate:\n    cmd: 'true'\n    params: [train]\n"
                                   "    metrics:\n      - metrics/eval.json:\n          cache: false\n")
    (repo / "metrics").mkdir()
    (repo / "metrics" / "eval.json").write_text(json.dumps(
        {"base": {"rouge_l": 0.1}, "tuned": {"rouge_l": 0.8}, "gate": {"passed": True, "reasons": []}}))
    (repo / "reports" / "eval").mkdir(parents=True)
    (repo / "reports" / "eval" / "predictions.jsonl").write_text(
        json.dumps(_row("What is PM?", "Full Time Employee.", "zz", "PM is Full Time Employee.")) + "\n"
        + json.dumps(_row("Expenses?", "Use the portal.", "zz", "Use the portal.")) + "\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "main")
    _git(repo, "checkout", "-qb", "feature")
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("r: 32", "r: 8"))
    (repo / "metrics" / "eval.json").write_text(json.dumps(
        {"base": {"rouge_l": 0.1}, "tuned": {"rouge_l": 0.7},
         "gate": {"passed": False, "reasons": ["rouge_l regressed by 0.1000 vs main"], "checks": [{}, {}]}}))
    (repo / "reports" / "eval" / "predictions.jsonl").write_text(
        json.dumps(_row("What is PM?", "Full Time Employee.", "zz", "PM means part-time.")) + "\n"
        + json.dumps(_row("Expenses?", "Use the portal.", "zz", "Use the portal.")) + "\n")
    _dvclive(repo, {"train/loss": [(i, 9 - i / 10) for i in range(30)], "val/loss": [(10, 8.5), (29, 7.0)]})
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "smaller rank")
    return repo


def test_end_to_end_comment_on_a_pull_request(pr_repo):
    proc = _run_comment(pr_repo, "--base", "main", "--out", "comment.md", "--no-estimate",
                        "--note", "Fork pull request: skipped the DVC remote.")
    assert proc.returncode == 0, proc.stderr
    text = (pr_repo / "comment.md").read_text()
    assert text.startswith(pc.MARKER + "\n")
    assert "> Fork pull request: skipped the DVC remote." in text
    assert "❌ **Failed** (1 of 2 checks)" in text and "rouge_l regressed by 0.1000 vs main" in text
    assert "**2 regression(s):** `gate.passed`, `tuned.rouge_l`" in text
    # main has no per-record scores: the tolerance alone decides, and the evaluation section says so
    assert "### Evaluation vs `main` (tuned model, paired over the test records)" in text
    assert "| `rouge_l` | 0.8 | 0.7 | -0.1000 |  | ❌ regression (> 0.02; significance not tested) |  |" in text
    assert "| params.yaml | train.lora.r | 32     | 8           |" in text        # dvc params diff --md
    assert "<summary><code>dvc metrics diff main --md</code></summary>" in text
    assert "tuned answers that differ from the base branch's" in text
    assert "**tuned, base branch:** PM is Full Time Employee." in text
    assert "**tuned, this PR:** PM means part-time." in text and "Expenses?" not in text
    assert 'title "train/loss by step"' in text and 'title "tuned (bars) vs base (line)"' in text
    assert (pr_repo / "build" / "pr-comment" / "loss.png").is_file()
    assert "_Estimate unavailable: skipped (--no-estimate)_" in text
    assert "**triggers training**" in text and "`params.yaml`" in text


def test_comment_in_a_pull_request_checkout_uses_origin_base(pr_repo, tmp_path):
    """A pull-request checkout (fetch-depth 0) has origin/main but no local main."""
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(pr_repo), str(clone))
    _git(clone, "checkout", "-q", "feature")
    if subprocess.run(["git", "rev-parse", "--verify", "--quiet", "main"], cwd=clone).returncode == 0:
        _git(clone, "branch", "-D", "main")
    assert pc.resolve_base("main", clone) == "origin/main"
    proc = _run_comment(clone, "--base", "main", "--out", "c.md", "--no-estimate", "--plots-dir", "")
    assert proc.returncode == 0, proc.stderr
    text = (clone / "c.md").read_text()
    assert "vs `origin/main`" in text and "train.lora.r" in text
    assert not (clone / "build" / "pr-comment").exists()
    proc = _run_comment(clone, "--base", "nope", "--out", "c.md", "--no-estimate")
    assert proc.returncode == 0
    assert "base revision 'nope' not found" in (clone / "c.md").read_text()


def test_base_predictions_come_from_the_dvc_cache_when_not_in_git(tmp_path):
    """reports/eval is a DVC output (git-ignored): the base branch's predictions are found through
    its dvc.lock in the local cache, never from a remote."""
    repo = tmp_path / "r"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "ci@example.invalid")
    _git(repo, "config", "user.name", "ci")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    old = json.dumps(_row("q", "r", "b", "old tuned")) + "\n"
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    file_md5, dir_md5 = "ab" + "1" * 30, "cd" + "2" * 30 + ".dir"
    (cache / "ab").mkdir(parents=True)
    (cache / "ab" / ("1" * 30)).write_text(old)
    (cache / "cd").mkdir()
    (cache / "cd" / ("2" * 30 + ".dir")).write_text(json.dumps([{"md5": file_md5, "relpath": "predictions.jsonl"}]))
    (repo / "dvc.lock").write_text(f"schema: '2.0'\nstages:\n  evaluate:\n    cmd: x\n    outs:\n"
                                   f"    - path: reports/eval\n      hash: md5\n      md5: {dir_md5}\n")
    _git(repo, "add", "dvc.lock")
    _git(repo, "commit", "-qm", "lock")
    assert pc.read_at_rev("main", "reports/eval/predictions.jsonl", repo) == old
    assert pc.read_at_rev("main", "reports/eval/other.jsonl", repo) is None


def test_default_run_in_this_repository(tmp_path):
    """The one command of the README works here, whatever stages have run so far."""
    out = tmp_path / "comment.md"
    proc = _run_comment(ROOT, "--base", "HEAD", "--out", str(out), "--plots-dir", str(tmp_path / "charts"))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    for heading in ("### Quality gate", "### Metrics vs `HEAD`", "### Params vs `HEAD`", "### Charts",
                    "### Answers that changed", "### Azure training estimate"):
        assert heading in text
    assert "Traceback" not in text


# ---------------------------------------------------------------------------------------------
# data counters, evaluation significance and comparability (issue 11 item 3, issue 15 item 7)


def test_removed_record_counters_are_worse_when_they_grow_and_token_counts_get_no_verdict():
    diff = {"metrics/preprocess.json": {
        "removed.too_long": {"old": 0, "new": 57}, "removed.pii": {"old": 3, "new": 1},
        "tokens.max": {"old": 93, "new": 256}, "tokens.mean": {"old": 70.4, "new": 120.0},
        "splits.test": {"old": 63, "new": 6}, "categories.leave": {"old": 108, "new": 4},
        "records_out": {"old": 1069, "new": 122}}}
    rows = {r.name: r.flag for r in pc.metric_rows(diff, GATED, 0.02)}
    assert rows == {"removed.too_long": "⚠️ worse", "removed.pii": "✅ better", "tokens.max": "",
                    "tokens.mean": "", "splits.test": "", "categories.leave": "", "records_out": ""}


def _eval(rouge: float, test_hash: str | None = "t1") -> dict:
    data = {"tuned": {"rouge_l": rouge}, "base": {"rouge_l": 0.1}, "gate": {"passed": True}}
    if test_hash:
        data["test_set"] = {"n": 40, "hash": test_hash}
    return data


def _records(scores, test_hash="t1") -> dict:
    return {"test_set": {"n": len(scores), "hash": test_hash},
            "records": [{"id": f"q{i:02d}", "tuned": {"rouge_l": v}} for i, v in enumerate(scores)]}


OLD = [0.5 + 0.01 * (i % 10) for i in range(40)]
NOISE = {"seeds": [0, 1, 2], "metrics": {"rouge_l": {"mean": 0.5, "sd": 0.012}}}


def test_a_significant_drop_is_a_regression_with_its_interval_and_seed_noise():
    new = [v - 0.1 for v in OLD]
    cmp = pc.compare_eval(_eval(sum(new) / 40), _records(new), _eval(sum(OLD) / 40), _records(OLD), "main",
                          ["rouge_l"], 0.02)
    assert cmp["comparable"] and cmp["regressions"] == ["rouge_l"]
    md = pc.evaluation_section(cmp, _eval(sum(new) / 40), NOISE, "main")
    assert "**1 regression(s):** `rouge_l`" in md
    assert "| `rouge_l` | 0.545 | 0.445 | -0.1000 | [-0.100, -0.100] | ❌ regression (> 0.02, significant) | ±0.012 |" in md
    assert "Seed noise: standard deviation over 3 training seeds" in md
    rows = pc.metric_rows({"metrics/eval_summary.json": {"tuned.rouge_l": {"old": 0.545, "new": 0.445}}},
                          GATED, 0.02)
    pc.apply_eval_flags(rows, cmp, 0.02)
    assert rows[0].regression and rows[0].flag == "❌ regression (> 0.02, significant)"


def test_a_drop_on_two_records_is_within_noise():
    new = list(OLD)
    new[0] -= 2.0
    new[1] -= 2.0                                        # mean -0.1, carried by two records
    cmp = pc.compare_eval(_eval(sum(new) / 40), _records(new), _eval(sum(OLD) / 40), _records(OLD), "main",
                          ["rouge_l"], 0.02)
    assert cmp["regressions"] == []
    md = pc.evaluation_section(cmp, _eval(sum(new) / 40), None, "main")
    assert "No regression: no gated metric dropped by more than 0.02 with a significant paired test." in md
    assert "| within noise |" in md and "Seed noise: not measured" in md
    rows = pc.metric_rows({"metrics/eval_summary.json": {"tuned.rouge_l": {"old": 0.545, "new": 0.445}}},
                          GATED, 0.02)
    pc.apply_eval_flags(rows, cmp, 0.02)
    assert not rows[0].regression and rows[0].flag == "within noise"


def test_different_test_sets_are_not_comparable_and_nothing_regresses():
    new = [v - 0.3 for v in OLD]
    cmp = pc.compare_eval(_eval(0.2, "t2"), _records(new, "t2"), _eval(0.545), _records(OLD), "main",
                          ["rouge_l"], 0.02)
    assert not cmp["comparable"] and cmp["regressions"] == []
    md = pc.evaluation_section(cmp, _eval(0.2, "t2"), None, "main")
    assert "⚠️ **Not comparable:** the test sets differ (different test-set hash)." in md
    assert "regression(s)" not in md
    rows = pc.metric_rows({"metrics/eval_summary.json": {"tuned.rouge_l": {"old": 0.545, "new": 0.2}},
                           "metrics/eval.json": {"base.rouge_l": {"old": 0.1, "new": 0.0}}}, GATED, 0.02)
    pc.apply_eval_flags(rows, cmp, 0.02)
    assert [(r.flag, r.regression) for r in rows] == [("not comparable", False), ("not comparable", False)]
    # files without a test-set hash (before eval_records.json existed): the preprocess data hash decides
    old_style = pc.compare_eval(_eval(0.2, None), None, _eval(0.545, None), None, "main", ["rouge_l"], 0.02,
                                "aaa", "bbb")
    assert not old_style["comparable"] and old_style["regressions"] == []
    assert old_style["not_comparable"] == "the data changed (metrics/preprocess.json data_hash differs)"
    same_data = pc.compare_eval(_eval(0.2, None), None, _eval(0.545, None), None, "main", ["rouge_l"], 0.02,
                                "aaa", "aaa")
    assert same_data["regressions"] == ["rouge_l"]          # the tolerance alone, and the section says so
    assert "significance not tested" in pc.evaluation_section(same_data, _eval(0.2, None), None, "main")


def test_detectable_difference_and_small_split_warning_lines():
    new = {"test_set": {"n": 6}, "significance": {"detectable_difference": {"rouge_l": 0.161, "length_ratio": 0.4},
                                                  "warning": "the test split (6 records) is too small"}}
    line = pc.detectable_line(new, None)
    assert line.startswith("⚠️ **Small test split:** the test split (6 records) is too small ")
    assert "Smallest difference 6 test records can detect (paired, alpha 0.05, power 0.8): rouge_l 0.161;" in line
    assert "length_ratio" not in line
