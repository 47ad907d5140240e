"""The quality gate and the reference comparison on crafted metrics files; the `gate` command's exit
codes and messages (what the deploy workflow and CI read)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.core.gate import Reference, compare, evaluate_gate, load_reference
from stages.core.params import ConfigError, GateParams

ROOT = Path(__file__).resolve().parents[1]
GATE = GateParams(min_tuned={"rouge_l": 0.3, "fact_recall": 0.3}, max_tuned={"no_end_token_rate": 0.2},
                  min_gain={"rouge_l": 0.1}, max_regression=0.02,
                  regression_metrics=["rouge_l", "bleu4", "fact_recall"])


def metrics(tuned_rouge=0.6, base_rouge=0.1, fact=0.7, no_end=0.0, bleu=0.4):
    return {"base": {"rouge_l": base_rouge, "bleu4": 0.01, "fact_recall": 0.0, "no_end_token_rate": 1.0,
                     "val_perplexity": 1e5},
            "tuned": {"rouge_l": tuned_rouge, "bleu4": bleu, "fact_recall": fact, "no_end_token_rate": no_end,
                      "val_perplexity": 12.0}}


def test_gate_passes_a_good_model():
    gate = evaluate_gate(metrics(), GATE)
    assert gate["passed"] is True and gate["reasons"] == []
    assert [c["check"] for c in gate["checks"]] == ["min_tuned", "min_tuned", "max_tuned", "min_gain"]


def test_gate_reasons_name_metric_value_and_threshold():
    gate = evaluate_gate(metrics(tuned_rouge=0.25, base_rouge=0.2, fact=0.1, no_end=0.5), GATE)
    assert gate["passed"] is False
    assert gate["reasons"] == [
        "tuned rouge_l 0.2500 < minimum 0.3",
        "tuned fact_recall 0.1000 < minimum 0.3",
        "tuned no_end_token_rate 0.5000 > maximum 0.2",
        "rouge_l gain over base +0.0500 < required +0.1 (base 0.2000, tuned 0.2500)",
    ]


def test_gate_fails_on_a_missing_metric_and_handles_lower_is_better_gains():
    gate = evaluate_gate({"base": {}, "tuned": {}}, GateParams(min_tuned={"judge_score": 3.0}, max_tuned={}, min_gain={}))
    assert gate["reasons"] == ["tuned judge_score is missing"]
    ppl = GateParams(min_tuned={}, max_tuned={}, min_gain={"val_perplexity": 10.0})
    assert evaluate_gate(metrics(), ppl)["passed"] is True           # 1e5 -> 12 is a gain
    m = metrics()
    m["tuned"]["val_perplexity"] = 2e5
    assert evaluate_gate(m, ppl)["passed"] is False


def test_comparison_flags_only_regressions_beyond_tolerance():
    ref = {"rouge_l": 0.62, "bleu4": 0.45, "fact_recall": 0.7, "no_end_token_rate": 0.0}
    now = metrics(tuned_rouge=0.605, bleu=0.40, fact=0.75)["tuned"]
    comp = compare(now, Reference(ref, "prod.json", None), GATE.regression_metrics, GATE.max_regression)
    assert comp["delta"]["rouge_l"] == pytest.approx(-0.015)       # within 0.02: not a regression
    assert comp["delta"]["bleu4"] == pytest.approx(-0.05)
    assert comp["regressions"] == ["bleu4"]
    gate = evaluate_gate(metrics(tuned_rouge=0.605, bleu=0.40, fact=0.75), GATE, comp)
    assert gate["passed"] is False and gate["reference"] == "prod.json"
    assert gate["reasons"] == ["bleu4 regressed by 0.0500 vs prod.json (tolerance 0.02; no per-record scores, "
                               "significance not tested)"]
    assert gate["notes"] == ["no per-record scores for this run: significance not tested, the tolerance alone decides"]


def test_load_reference_accepts_stage_format_and_flat_and_rejects_junk(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(metrics()))
    (tmp_path / "b.json").write_text(json.dumps({"rouge_l": 0.5, "other": 1}))
    (tmp_path / "c.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "d.json").write_text("{not json")
    assert load_reference("a.json", tmp_path).tuned["rouge_l"] == 0.6
    assert load_reference("b.json", tmp_path) == Reference({"rouge_l": 0.5}, "b.json", None)
    with pytest.raises(ConfigError, match="no metrics found"):
        load_reference("c.json", tmp_path)
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_reference("d.json", tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        load_reference("missing.json", tmp_path)
    with pytest.raises(ConfigError, match="git show failed"):
        load_reference("no-such-rev:metrics/eval.json", tmp_path)


# --- the command ------------------------------------------------------------------------------------

def _gate_cmd(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "stages.evaluate", "gate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture()
def workdir(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["evaluate"]["gate"] = GATE.model_dump()
    raw["evaluate"]["reference"] = ""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "metrics").mkdir()
    return tmp_path


def test_gate_command_exit_codes(workdir):
    (workdir / "metrics" / "eval.json").write_text(json.dumps(metrics()))
    ok = _gate_cmd(workdir, "--metrics", "metrics/eval.json")
    assert ok.returncode == 0, ok.stderr
    assert "quality gate: PASSED (4 checks)" in ok.stdout

    (workdir / "metrics" / "eval.json").write_text(json.dumps(metrics(tuned_rouge=0.15)))
    bad = _gate_cmd(workdir, "--metrics", "metrics/eval.json")
    assert bad.returncode == 1
    assert "quality gate: FAILED (2 of 4 checks)" in bad.stderr
    assert "tuned rouge_l 0.1500 < minimum 0.3" in bad.stderr
    assert "rouge_l gain over base +0.0500 < required +0.1" in bad.stderr
    assert "Traceback" not in bad.stderr

    verdict = _gate_cmd(workdir, "--metrics", "metrics/eval.json", "--json")
    assert verdict.returncode == 1 and json.loads(verdict.stdout)["passed"] is False


def test_gate_command_bad_inputs_are_clear_config_errors(workdir):
    missing = _gate_cmd(workdir, "--metrics", "metrics/nope.json")
    assert missing.returncode == 2 and "metrics/nope.json not found" in missing.stderr
    (workdir / "metrics" / "eval.json").write_text('{"base": {}}')
    wrong = _gate_cmd(workdir, "--metrics", "metrics/eval.json")
    assert wrong.returncode == 2 and "has no 'tuned' metrics" in wrong.stderr
    (workdir / "metrics" / "eval.json").write_text(json.dumps(metrics()))
    ref = _gate_cmd(workdir, "--metrics", "metrics/eval.json", "--reference", "elsewhere.json")
    assert ref.returncode == 2 and "reference 'elsewhere.json': no such file" in ref.stderr
    for result in (missing, wrong, ref):
        assert "Traceback" not in result.stderr


def test_gate_command_against_a_git_revision(workdir):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    (workdir / "metrics" / "eval.json").write_text(json.dumps(metrics(tuned_rouge=0.70)))
    for cmd in (["git", "init", "-q"], ["git", "add", "metrics/eval.json"], ["git", "commit", "-qm", "prod"]):
        subprocess.run(cmd, cwd=workdir, env=env, check=True)
    # the new model is good in absolute terms but 0.1 worse than the committed one
    (workdir / "metrics" / "eval.json").write_text(json.dumps(metrics(tuned_rouge=0.60)))
    result = _gate_cmd(workdir, "--metrics", "metrics/eval.json", "--reference", "HEAD:metrics/eval.json")
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("rouge_l regressed by 0.1000 vs git HEAD:metrics/eval.json (tolerance 0.02; no per-record scores, "
            "significance not tested)") in result.stderr
    # params' evaluate.reference is the default when the command line gives none
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw["evaluate"]["reference"] = "HEAD:metrics/eval.json"
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))
    assert _gate_cmd(workdir, "--metrics", "metrics/eval.json").returncode == 1
    # and an equal model passes
    (workdir / "metrics" / "eval.json").write_text(json.dumps(metrics(tuned_rouge=0.69)))
    assert _gate_cmd(workdir, "--metrics", "metrics/eval.json").returncode == 0


def test_gate_command_does_not_import_torch(workdir):
    (workdir / "metrics" / "eval.json").write_text(json.dumps(metrics()))
    code = ("import sys, runpy; sys.argv=['x','gate','--metrics','metrics/eval.json'];\n"
            "from stages.evaluate import main; rc = main(sys.argv[1:]);\n"
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _records(scores, test_hash="t1"):
    return {"test_set": {"n": len(scores), "hash": test_hash},
            "records": [{"id": f"q{i}", "tuned": {"rouge_l": v}} for i, v in enumerate(scores)]}


def test_gate_command_pairs_records_with_the_revision(workdir):
    """The reference's per-record scores come from the same revision (git show REV:metrics/eval_records.json)."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    m = workdir / "metrics"
    old = [0.6 + 0.01 * (i % 20) for i in range(40)]
    (m / "eval.json").write_text(json.dumps({**metrics(tuned_rouge=sum(old) / 40), "test_set": {"hash": "t1"}}))
    (m / "eval_records.json").write_text(json.dumps(_records(old)))
    for cmd in (["git", "init", "-q"], ["git", "add", "metrics"], ["git", "commit", "-qm", "prod"]):
        subprocess.run(cmd, cwd=workdir, env=env, check=True)
    # 0.1 worse on every record: a significant regression, and the reason quotes the interval
    worse = [v - 0.1 for v in old]
    (m / "eval.json").write_text(json.dumps({**metrics(tuned_rouge=sum(worse) / 40), "test_set": {"hash": "t1"}}))
    (m / "eval_records.json").write_text(json.dumps(_records(worse)))
    result = _gate_cmd(workdir, "--metrics", "metrics/eval.json", "--reference", "HEAD:metrics/eval.json")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rouge_l regressed by 0.1000 vs git HEAD:metrics/eval.json (tolerance 0.02; paired test -0.1000 " \
           "[95% CI -0.1000, -0.1000], p=" in result.stderr
    assert "rouge_l: regression, -0.1000 [95% CI" in result.stdout
    # the same mean drop on two records only (the others unchanged) is within noise: the gate passes
    few = list(old)
    few[0], few[1] = old[0] - 2.0, old[1] - 2.0
    (m / "eval.json").write_text(json.dumps({**metrics(tuned_rouge=sum(few) / 40), "test_set": {"hash": "t1"}}))
    (m / "eval_records.json").write_text(json.dumps(_records(few)))
    result = _gate_cmd(workdir, "--metrics", "metrics/eval.json", "--reference", "HEAD:metrics/eval.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rouge_l: within noise, -0.1000 [95% CI" in result.stdout
    # a different test set: not comparable, no regression check, and the command says so
    (m / "eval.json").write_text(json.dumps({**metrics(tuned_rouge=0.2 + 0.5), "test_set": {"hash": "t2"}}))
    (m / "eval_records.json").write_text(json.dumps(_records(worse, "t2")))
    result = _gate_cmd(workdir, "--metrics", "metrics/eval.json", "--reference", "HEAD:metrics/eval.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "note: not comparable with git HEAD:metrics/eval.json: the test sets differ" in result.stdout
