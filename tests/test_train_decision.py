"""stages.ci.train_decision: train.yml trains a merged commit only when its dvc.lock is stale (issue 21 item 5).

On a tiny DVC repository in tmp (`dvc init --no-scm`, stand-in stages, a local directory as the remote):
a commit whose dvc.lock matches its params, code and data, with every output on the remote, is "current"
in a fresh checkout (no cache, no outputs); a changed param, changed code, outputs missing from the
remote or no dvc.lock make it "stale", with the reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.ci import train_decision as td

ROOT = Path(__file__).resolve().parents[1]
DVC_YAML = """
stages:
  preprocess:
    cmd: python prep.py
    deps: [prep.py, raw.txt]
    params: [preprocess]
    outs: [processed.txt]
  train:
    cmd: python train.py
    deps: [train.py, processed.txt]
    params: [train]
    outs: [adapter.bin]
    metrics:
      - metrics.json:
          cache: false
"""
PARAMS = {"preprocess": {"min_chars": 3}, "train": {"lora": {"r": 16}, "epochs": 1}}


def _dvc(repo: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _decide(repo: Path, tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "decision.json"
    gh = tmp_path / "gh_output"
    gh.write_text("")
    proc = subprocess.run([sys.executable, "-m", "stages.ci.train_decision", "--json", str(out), "--github-output",
                           str(gh), *args], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert gh.read_text() == f"decision={result['decision']}\n"
    return result, proc.stdout


@pytest.fixture(scope="module")
def trained(module_dir) -> tuple[Path, Path]:
    """A repository whose pipeline ran and was pushed to its remote: the state a results PR merges."""
    base = module_dir("decision")
    repo, remote = base / "repo", base / "remote"
    repo.mkdir()
    remote.mkdir()
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (repo / "raw.txt").write_text("question one\nquestion two\n")
    (repo / "prep.py").write_text("open('processed.txt', 'w').write(open('raw.txt').read().upper())\n")
    (repo / "train.py").write_text("import json\nopen('adapter.bin', 'w').write(open('processed.txt').read()[::-1])\n"
                                   "json.dump({'loss': 0.5}, open('metrics.json', 'w'))\n")
    _dvc(repo, "init", "--no-scm", "-q")
    _dvc(repo, "remote", "add", "-d", "storage", str(remote))
    _dvc(repo, "repro", "-q")
    _dvc(repo, "push", "-q")
    return repo, remote


def _fresh_checkout(trained: tuple[Path, Path], dest: Path, remote: Path | None = None) -> Path:
    """What a runner has after actions/checkout of the merged commit: git-tracked files, no DVC cache or outputs."""
    repo, original_remote = trained
    shutil.copytree(repo, dest, ignore=shutil.ignore_patterns("cache", "tmp", "processed.txt", "adapter.bin"))
    if remote is not None:
        _dvc(dest, "remote", "modify", "storage", "url", str(remote))
    return dest


def test_a_current_lock_is_not_trained_again(trained, tmp_path):
    repo = _fresh_checkout(trained, tmp_path / "checkout")
    assert not (repo / "adapter.bin").exists() and not (repo / ".dvc" / "cache").exists()
    result, log = _decide(repo, tmp_path)
    assert result["decision"] == "current" and result["reasons"] == [] and result["changed"] == {}
    assert log.startswith("current: dvc.lock matches this commit's data, params and code")
    # the remote is named from params.yaml's azure.storage.dvc_remote_name when --remote is not given
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["azure"] = {"storage": {"dvc_remote_name": "storage"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert td.remote_from_params(repo / "params.yaml") == "storage"


@pytest.mark.parametrize("edit, reason", [
    (lambda r: (r / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "train": {"lora": {"r": 8}, "epochs": 1}})),
     "train changed (param train.lora.r 16 → 8)"),
    (lambda r: (r / "train.py").write_text((r / "train.py").read_text() + "# tuned\n"), "train changed (train.py modified)"),
    (lambda r: (r / "raw.txt").write_text("question three\n"), "preprocess changed (raw.txt modified)"),
    (lambda r: (r / "metrics.json").write_text('{"loss": 0.1}'), "train changed (output metrics.json modified)"),
])
def test_a_stale_lock_trains(trained, tmp_path, edit, reason):
    repo = _fresh_checkout(trained, tmp_path / "checkout")
    edit(repo)
    result, log = _decide(repo, tmp_path, "--remote", "storage")
    assert result["decision"] == "stale" and reason in result["reasons"], result
    assert log.startswith("stale: dvc.lock does not match this commit: train on Azure ML")


def test_outputs_missing_from_the_remote_or_no_lock_train(trained, tmp_path):
    empty = tmp_path / "empty-remote"
    empty.mkdir()
    repo = _fresh_checkout(trained, tmp_path / "checkout", remote=empty)
    result, _ = _decide(repo, tmp_path)
    assert result["decision"] == "stale"
    assert result["reasons"] == ["not on the DVC remote: adapter.bin, processed.txt"]
    (repo / "dvc.lock").unlink()
    result, _ = _decide(repo, tmp_path, "--no-remote")
    assert result["decision"] == "stale"
    assert result["reasons"][0] == "no dvc.lock: nothing was trained for this commit"
    assert "the DVC remote was not checked" in result["reasons"][-1]


def test_decide_on_crafted_status():
    dvc_yaml = yaml.safe_load(DVC_YAML)
    lock = {"stages": {"preprocess": {}, "train": {}}}
    fresh = {"preprocess": [{"changed outs": {"processed.txt": "not in cache"}}],
             "train": [{"changed deps": {"processed.txt": "deleted"}}, {"changed outs": {"adapter.bin": "not in cache"}}]}
    assert td.decide(fresh, {"adapter.bin": "deleted"}, dvc_yaml, lock, PARAMS)["decision"] == "current"
    stale = td.decide(fresh, {"adapter.bin": "new"}, dvc_yaml, {"stages": {"preprocess": {}}}, PARAMS)
    assert stale["reasons"] == ["train is not in dvc.lock", "not on the DVC remote: adapter.bin"]


def test_train_yml_trains_only_a_stale_lock():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "train.yml").read_text())
    steps = wf["jobs"]["train"]["steps"]
    ids = [s.get("id") for s in steps]
    decide = steps[ids.index("decide")]
    assert "python -m stages.ci.train_decision" in decide["run"] and "$GITHUB_OUTPUT" in decide["run"]
    login = next(i for i, s in enumerate(steps) if "azure/login" in str(s.get("uses", "")))
    assert login < ids.index("decide")  # the remote check needs the sign-in
    for step in steps[ids.index("decide") + 1:]:
        assert "steps.decide.outputs.decision == 'stale'" in step.get("if", ""), step.get("name")
