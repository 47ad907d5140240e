"""stages.ci.proxy and the comment's proxy section: issue 21 item 3, offline, with no training.

The production configuration (presets/llama-3.2-1b applied) and a pull request that changes train.lora.r:
the proxy plan carries the change over to the CPU default, lists what did not apply; `prepare` checks out
both revisions with their proxy params.yaml; the comment, from crafted evaluation files of both sides (a
fact_recall regression on the head), flags the regression under a heading that says it is a proxy.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.ci import proxy as px
from stages.ci import pr_comment as pc
from stages.preset import applied, load_preset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_plan import NO_NETWORK, _env, _repo_copy  # noqa: E402  (the plan tests' offline helpers)

DEFAULT = yaml.safe_load((ROOT / "params.yaml").read_text())
LLAMA = applied(DEFAULT, load_preset("llama-3.2-1b"))


def _with(tree: dict, **changes) -> dict:
    out = copy.deepcopy(tree)
    for key, value in changes.items():
        px._put(out, key.replace("__", "."), value)
    return out


def test_a_lora_rank_change_on_the_llama_configuration_applies_to_the_proxy():
    head = _with(LLAMA, train__lora__r=8, model__max_seq_length=LLAMA["model"]["max_seq_length"] + 128)
    result = px.proxy_params(LLAMA, head)
    assert result["changed"] == ["model.max_seq_length", "train.lora.r"]
    assert result["model"] == "smollm2-135m" and result["production_model"] == "meta-llama/Llama-3.2-1B-Instruct"
    # both sides run the proxy model; the rank moves by the PR's factor (32 -> 8 is x0.25: 16 -> 4)
    for side in px.SIDES:
        assert result[side]["model"]["base"] == result[side]["model"]["tokenizer"] == "smollm2-135m"
    assert result["base"]["train"]["lora"]["r"] == 16 and result["head"]["train"]["lora"]["r"] == 4
    assert result["applied"] == [{"key": "train.lora.r", "production": "32 → 8",
                                  "proxy": "16 → 4 (the PR's factor ×0.25)"}]
    # model.* is the production model's: not applied, said so, and the head keeps the base side's value
    assert result["not_applied"] == [{
        "key": "model.max_seq_length", "production": f"{LLAMA['model']['max_seq_length']} → "
                                                     f"{LLAMA['model']['max_seq_length'] + 128}",
        "reason": "a setting of the production model; the proxy runs smollm2-135m"}]
    assert result["head"]["model"] == result["base"]["model"]
    # nothing else differs between the two sides
    base, now = px.flatten(result["base"]), px.flatten(result["head"])
    assert {k for k in base if base[k] != now.get(k)} == {"train.lora.r"}
    # the proxy's own settings (the preset) on both sides, not the production model's
    assert result["base"]["train"]["epochs"] == 1 and result["base"]["train"]["learning_rate"] == 1e-3


def test_keys_outside_the_preset_carry_over_and_changes_without_a_factor_do_not():
    head = _with(LLAMA, train__learning_rate=2e-4, train__lora__dropout=0.0, evaluate__gate__max_regression=0.05,
                 train__epochs=5)
    result = px.proxy_params(LLAMA, head)
    applied_ = {e["key"]: e["proxy"] for e in result["applied"]}
    not_applied = {e["key"]: e["reason"] for e in result["not_applied"]}
    assert applied_ == {"evaluate.gate.max_regression": "0.02 → 0.05",
                        "train.learning_rate": "0.001 → 0.002 (the PR's factor ×2)"}
    assert not_applied == {
        "train.lora.dropout": "presets/smollm2-135m.yaml sets it for the proxy (0.0), and the change has no "
                              "proportional equivalent there",
        "train.epochs": "presets/smollm2-135m.yaml sets it for the proxy (1); the PR's factor ×1.25 rounds back to 1"}
    assert result["head"]["train"]["epochs"] == 1 and result["head"]["train"]["lora"]["dropout"] == 0.0
    assert result["head"]["evaluate"]["gate"]["max_regression"] == 0.05
    # a PR that switches the default to the production model: the model keys do not apply
    switch = px.proxy_params(DEFAULT, _with(LLAMA, train__lora__r=8))
    assert {"model.base", "model.tokenizer"} <= {e["key"] for e in switch["not_applied"]}
    assert switch["head"]["model"]["base"] == "smollm2-135m"
    assert switch["head"]["train"]["lora"]["r"] == 8  # 16 -> 8 on the production model is x0.5 of the proxy's 16
    # an unchanged PR: nothing to apply, identical sides
    same = px.proxy_params(LLAMA, copy.deepcopy(LLAMA))
    assert same["changed"] == [] and same["base"] == same["head"]


def test_the_plan_command_line(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(LLAMA))
    (tmp_path / "head.yaml").write_text(yaml.safe_dump(_with(LLAMA, train__lora__r=64)))
    proc = subprocess.run([sys.executable, "-m", "stages.ci.proxy", "plan", "--base-params", str(tmp_path / "base.yaml"),
                           "--head-params", str(tmp_path / "head.yaml"), "--json", str(tmp_path / "p.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["head"]["train"]["lora"]["r"] == 32 and result["not_applied"] == []


# ---------------------------------------------------------------------------------------------
# end to end on a copy of this repository: prepare, crafted runs, the complete comment


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _regressed(records: dict, metrics: dict) -> tuple[dict, dict]:
    """The head side's evaluation: the base side's, with fact_recall lost on half of the records that had it."""
    records, metrics = copy.deepcopy(records), copy.deepcopy(metrics)
    hits = [r for r in records["records"] if isinstance(r["tuned"].get("fact_recall"), (int, float))
            and r["tuned"]["fact_recall"] > 0]
    for record in hits[::2]:
        record["tuned"]["fact_recall"] = 0.0
    scored = [r["tuned"]["fact_recall"] for r in records["records"] if isinstance(r["tuned"].get("fact_recall"), (int, float))]
    metrics["tuned"]["fact_recall"] = round(sum(scored) / len(scored), 6)
    return records, metrics


@pytest.fixture(scope="module")
def production_pr(module_dir) -> tuple[Path, Path]:
    """A copy of this repository whose main has the Llama preset, and a PR branch that sets train.lora.r: 8."""
    work = module_dir("proxy")
    repo = _repo_copy(work / "repo")
    subprocess.run([sys.executable, "-m", "stages.preset", "apply", "llama-3.2-1b", "--params",
                    str(repo / "params.yaml")], cwd=ROOT, check=True, capture_output=True, timeout=120)
    _git(repo, "checkout", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "production configuration")
    _git(repo, "checkout", "-q", "-b", "pr")
    text = (repo / "params.yaml").read_text()
    assert text.count("    r: 32\n") == 1
    (repo / "params.yaml").write_text(text.replace("    r: 32\n", "    r: 8\n"))
    _git(repo, "commit", "-q", "-am", "train.lora.r: 8")
    return repo, work


def test_prepare_checks_out_both_sides_with_their_proxy_params(production_pr):
    repo, _ = production_pr
    info = px.prepare("main", "pr", Path("build/proxy"), repo)
    build = repo / "build" / "proxy"
    assert json.loads((build / "proxy.json").read_text()) == info
    assert info["revisions"]["base"]["sha"] == _git(repo, "rev-parse", "main")
    assert info["revisions"]["head"]["sha"] == _git(repo, "rev-parse", "pr")
    assert [e["key"] for e in info["applied"]] == ["train.lora.r"] and info["not_applied"] == []
    for side, rank in (("base", 16), ("head", 4)):
        params = yaml.safe_load((build / side / "params.yaml").read_text())
        assert params["model"]["base"] == "smollm2-135m" and params["train"]["lora"]["r"] == rank
        assert info["params"][side]["train.lora.r"] == rank
        # the worktree is that revision: its code and dvc.lock, only params.yaml differs
        assert (build / side / "dvc.lock").read_text() == (repo / "dvc.lock").read_text()
    # again (a re-run of the job step) replaces the worktrees
    px.prepare("main", "pr", Path("build/proxy"), repo)
    assert px.repro_command(True)[2:] == ["dvc", "repro", "--pull", "--allow-missing", "publish_eval"]
    assert px.repro_command(False)[2:] == ["dvc", "repro", "publish_eval"]


def test_the_comment_flags_a_proxy_regression_under_a_proxy_heading(production_pr, tmp_path):
    repo, _ = production_pr
    info = px.prepare("main", "pr", Path("build/proxy"), repo)
    build = repo / "build" / "proxy"
    # crafted runs: the base side's evaluation is the committed one; the head lost fact recall
    base_eval = json.loads((ROOT / "metrics" / "eval.json").read_text())
    base_records = json.loads((ROOT / "metrics" / "eval_records.json").read_text())
    head_records, head_eval = _regressed(base_records, base_eval)
    for side, metrics, records in (("base", base_eval, base_records), ("head", head_eval, head_records)):
        (build / side / "metrics" / "eval.json").write_text(json.dumps(metrics))
        (build / side / "metrics" / "eval_records.json").write_text(json.dumps(records))
    # what a pull request against a warmed base commit sees (proxy-cache.yml): the base side restored
    command = "dvc repro --pull --allow-missing publish_eval"
    info["runs"] = {"base": {"ok": True, "seconds": 1.0, "command": command, "ran": ["preprocess", "publish_eval"],
                             "restored": ["base", "train", "evaluate_base", "evaluate"]},
                    "head": {"ok": True, "seconds": 1.0, "command": command,
                             "ran": ["preprocess", "train", "evaluate", "publish_eval"],
                             "restored": ["base", "evaluate_base"]}}
    px.write_json(build / "proxy.json", info)

    md = pc.build_proxy_section(build, "main")
    assert md.startswith("### Proxy verdict: the same change on `smollm2-135m` (CPU), not on "
                         "`meta-llama/Llama-3.2-1B-Instruct`")
    assert "**What it can tell:** the direction of a data or training-setting change" in md
    assert "**What it cannot tell:** the quality of `meta-llama/Llama-3.2-1B-Instruct`" in md
    assert "| `train.lora.r` | 32 → 8 | applied: 16 → 4 (the PR's factor ×0.25) |" in md
    assert ("Runs: base: `dvc repro --pull --allow-missing publish_eval` ok in 1.0 s, ran preprocess, publish_eval, "
            "restored base, train, evaluate_base, evaluate from the run cache; head: ") in md
    assert "**1 regression(s):** `fact_recall`" in md
    row = next(line for line in md.splitlines() if line.startswith("| `fact_recall` |"))
    assert "❌ regression (> 0.02, significant)" in row
    assert next(line for line in md.splitlines() if line.startswith("| `rouge_l` |")).split("|")[6].strip() == ""

    # the complete comment of the pull-request job for the production configuration, offline: the plan
    # (train not started, proxy true), then the proxy section; nothing trained, no network call
    env = _env(tmp_path)
    plan = subprocess.run([sys.executable, "-c", NO_NETWORK, "stages.ci.plan", "--json", str(tmp_path / "plan.json"),
                           "--github-output", str(tmp_path / "gh")], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert plan.returncode == 0 and "NETWORK CALL" not in plan.stdout + plan.stderr, plan.stderr[-3000:]
    assert (tmp_path / "gh").read_text() == "targets=\nproxy=true\n"
    proc = subprocess.run([sys.executable, "-c", NO_NETWORK, "stages.ci.pr_comment", "--base", "main", "--out",
                           str(tmp_path / "comment.md"), "--plots-dir", "", "--plan", str(tmp_path / "plan.json"),
                           "--proxy", "build/proxy"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "NETWORK CALL" not in log, log[-3000:]
    comment = (tmp_path / "comment.md").read_text()
    assert comment.index("### What CI ran") < comment.index("### Proxy verdict") < comment.index("### Params vs")
    assert md in comment
    assert "| train | ⏸️ not started here | train changed (" in comment and "needs an H100" in comment
    assert ("The model's training or evaluation is not started here, so the same change ran through the CPU "
            "default on the base branch and on this PR: the proxy verdict below.") in comment
    # the proxy worktrees are not part of this checkout's pipeline: the params diff is the PR's own
    params_md = comment[comment.index("### Params vs"):].split("\n### ")[0]
    assert "train.lora.r" in params_md and "build/proxy" not in params_md


def test_a_failed_or_missing_proxy_run_says_so(tmp_path):
    assert pc.build_proxy_section(tmp_path).endswith("not found._")
    info = {"model": "smollm2-135m", "production_model": "meta-llama/Llama-3.2-1B-Instruct", "applied": [],
            "not_applied": [], "revisions": {}, "params": {},
            "runs": {"base": {"ok": True, "seconds": 3}, "head": {"ok": False, "seconds": 9}}}
    px.write_json(tmp_path / "proxy.json", info)
    md = pc.build_proxy_section(tmp_path)
    assert "head: `dvc repro publish_eval` FAILED in 9 s" in md
    assert md.endswith("_No proxy comparison: dvc repro publish_eval failed on the head side (build/proxy/head.log in "
                       "the job's artifact)._")
    assert "❌" not in md and "| metric |" not in md


def test_run_records_each_side_and_what_dvc_ran(tmp_path, monkeypatch):
    """`run` without DVC: a stand-in command per side (the real one trains, which the suite does not)."""
    for side in px.SIDES:
        (tmp_path / side).mkdir()
    px.write_json(tmp_path / "proxy.json", {"model": "smollm2-135m"})
    # what DVC 3 prints for a stage it runs and for one it restores from the run cache
    script = ("import os, sys; print(\"Stage 'base' is cached - skipping run, checking out outputs\"); "
              "print(\"Running stage 'train':\"); print(\"Running stage 'evaluate':\"); "
              "sys.exit(0 if os.path.basename(os.getcwd()) == 'base' else 3)")
    monkeypatch.setattr(px, "repro_command", lambda pull, target=px.TARGET: [sys.executable, "-c", script])
    info = px.run(tmp_path, pull=True)
    assert info["runs"]["base"]["ok"] is True and info["runs"]["head"]["ok"] is False
    assert info["runs"]["base"]["ran"] == ["train", "evaluate"]
    assert info["runs"]["base"]["restored"] == ["base"]
    px.write_json(tmp_path / "proxy.json", {**info, "runs": {**info["runs"], "head": info["runs"]["base"]}})
    assert "ok in" in pc.build_proxy_section(tmp_path)
    assert "ran train, evaluate, restored base from the run cache" in pc.build_proxy_section(tmp_path)
    px.write_json(tmp_path / "proxy.json", info)
    assert json.loads((tmp_path / "proxy.json").read_text())["runs"] == info["runs"]
    assert "Running stage 'evaluate'" in (tmp_path / "head.log").read_text()
    assert "failed on the head side" in pc.build_proxy_section(tmp_path)
    # `warm` (proxy-cache.yml on main) runs the base side alone
    assert list(px.run(tmp_path, sides=("base",))["runs"]) == ["base"]


def test_main_warms_the_cache_that_pull_requests_restore_for_the_proxy():
    """proxy-cache.yml runs the proxy's base side on each push to main and saves the DVC cache under that
    commit; ci.yml restores the cache of its base commit before the proxy, so the base side comes from
    the run cache (a pull request may read its base branch's caches, not another pull request's)."""
    warm = yaml.safe_load((ROOT / ".github" / "workflows" / "proxy-cache.yml").read_text())
    assert warm[True]["push"]["branches"] == ["main"]  # PyYAML reads the key `on` as True
    steps = warm["jobs"]["warm"]["steps"]
    saved = next(s for s in steps if str(s.get("uses", "")).startswith("actions/cache@"))
    assert saved["with"] == {"path": ".dvc/cache", "key": "dvc-proxy-${{ github.sha }}", "restore-keys": "dvc-proxy-\n"}
    run = next(s for s in steps if "stages.ci.proxy warm" in s.get("run", ""))
    assert run["if"] == saved["if"] == "steps.plan.outputs.proxy == 'true'"
    assert warm["jobs"]["warm"]["permissions"] == {"contents": "read"}
    ci = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    pipeline = ci["jobs"]["pipeline"]["steps"]
    restore = next(s for s in pipeline if str(s.get("uses", "")).startswith("actions/cache@"))
    assert restore["with"]["path"] == ".dvc/cache"
    assert restore["with"]["restore-keys"].splitlines()[0] == "dvc-proxy-${{ github.event.pull_request.base.sha }}"
    assert pipeline.index(restore) < [s.get("id") for s in pipeline].index("proxy")


def test_ci_runs_the_proxy_behind_the_plan_and_passes_it_to_the_comment():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    steps = {s.get("id"): s for s in wf["jobs"]["pipeline"]["steps"] if s.get("id")}
    assert steps["proxy"]["if"] == "steps.plan.outputs.proxy == 'true'"
    assert "python -m stages.ci.proxy verdict --base-rev \"origin/$BASE_REF\"" in steps["proxy"]["run"]
    report = next(s for s in wf["jobs"]["pipeline"]["steps"] if s.get("name") == "Build the report")
    assert "--proxy build/proxy" in report["run"] and "${proxy[@]}" in report["run"]
    order = [s.get("id") for s in wf["jobs"]["pipeline"]["steps"]]
    assert order.index("plan") < order.index("repro") < order.index("proxy")


def test_the_plan_asks_for_the_proxy_when_evaluate_cannot_run_here(tmp_path):
    """On the Llama configuration, a PR that changes only the gate: train comes from the remote, evaluate
    (which loads the 1B model) is not started, and the proxy shows the change instead."""
    from stages.ci import plan as cp

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(LLAMA))
    status = {"evaluate": [{"changed deps": {"params.yaml": {"evaluate.gate.max_regression": "modified"}}}]}
    plan = cp.make_plan(params, status=status, remote=True, cwd=ROOT)
    decisions = {e["stage"]: e["decision"] for e in plan["stages"]}
    assert decisions["train"] == "cache" and decisions["evaluate"] == "not_started"
    assert plan["proxy"] is True
