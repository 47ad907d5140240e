"""stages.ci.pr_train: real training on request inside a pull request (issue 21 item 4), offline.

A copy of this repository with the Llama preset on main and a PR that sets train.lora.r: 8, a local bare
git repository as the PR's remote, a fake GitHub (pull requests, permissions, one comment) and a fake
MLClient (the submission, a status sequence, the job's results output). The flow: /train by a maintainer ->
estimate, submit (stages.azure.jobs.submit_job, train.yml's path) -> queued -> running -> completed ->
a bot commit with dvc.lock and metrics/ on the PR branch -> the comment rewritten with the real paired
comparison; forks and Dependabot refused; a push after the run marks the results stale. No network call.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.ci import pr_train as pt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_plan import _repo_copy  # noqa: E402  (a copy of this repository's tracked files)
from test_proxy import _regressed  # noqa: E402  (a fact_recall regression on half the records that had it)

REPO = "acme/llama"


def _git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"network call to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


# ---------------------------------------------------------------- fakes

class FakeGitHub:
    """Pull requests, permissions and the comments of one repository, in memory."""

    def __init__(self, pulls: dict, permissions: dict | None = None):
        self.pulls, self.permissions = pulls, permissions or {}
        self.comments: dict[int, list[dict]] = {}
        self.bodies: list[str] = []   # every version written, in order

    def pull(self, number):
        return json.loads(json.dumps(self.pulls[number]))

    def permission(self, user):
        if user not in self.permissions:
            raise pt.github_comment.GitHubError("HTTP 404")
        return self.permissions[user]

    def find_comment(self, pr):
        return next((c for c in self.comments.get(pr, []) if pt.MARKER in c["body"]), None)

    def upsert_comment(self, pr, body):
        self.bodies.append(body)
        found = self.find_comment(pr)
        if found:
            found["body"] = body
        else:
            self.comments.setdefault(pr, []).append({"id": len(self.bodies), "body": body})

    def body(self, pr=7) -> str:
        return self.find_comment(pr)["body"]


class FakeJobs:
    def __init__(self, statuses, results: Path):
        self.statuses, self.results = list(statuses), results
        self.submitted, self.downloads = None, []

    def create_or_update(self, job):
        self.submitted = job
        return type("Submitted", (), {"name": "job-42", "studio_url": "https://ml.azure.com/runs/job-42",
                                      "status": "NotStarted"})()

    def get(self, name):
        if self.statuses[0] == "error":   # a transient failure of the status call
            self.statuses.pop(0)
            raise ConnectionResetError("connection reset by peer")
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return type("J", (), {"status": status})()

    def download(self, name, download_path, output_name):
        from stages.azure.launch import collect

        self.downloads.append((name, output_name))
        collect(Path(download_path) / "named-outputs" / output_name,
                yaml.safe_load((ROOT / "dvc.yaml").read_text()), root=self.results)

    class _runs_operations:  # noqa: N801 - the SDK's private attribute that failure_reason reads
        @staticmethod
        def get_run_details(name):
            error = type("E", (), {"as_dict": lambda self: {"error": {"code": "UserError",
                                                                      "message": "CUDA out of memory\nstack..."}}})()
            return type("D", (), {"error": error})()


class FakeMLClient:
    def __init__(self, statuses, results: Path):
        self.jobs = FakeJobs(statuses, results)
        self.workspace_name = "ws"
        workspace = type("W", (), {"key_vault": "/subscriptions/s/resourceGroups/r/providers/Microsoft.KeyVault/vaults/kv-pr"})()
        self.workspaces = type("WS", (), {"get": lambda self, name: workspace})()
        self.environments = type("Envs", (), {"create_or_update": lambda self, env: (
            setattr(env, "version", env.version or "3") or env)})()


# ---------------------------------------------------------------- the repository, its remote, the PR

@pytest.fixture(scope="module")
def project(module_dir):
    """main (Llama preset) and pr (train.lora.r: 8) in a local bare remote; the job's crafted results."""
    work = module_dir("pr_train")
    src = _repo_copy(work / "src")
    subprocess.run([sys.executable, "-m", "stages.preset", "apply", "llama-3.2-1b", "--params",
                    str(src / "params.yaml")], cwd=ROOT, check=True, capture_output=True, timeout=120)
    _git(src, "checkout", "-q", "-b", "main")
    _git(src, "add", "-A")
    _git(src, "commit", "-q", "-m", "production configuration")
    _git(src, "checkout", "-q", "-b", "pr")
    text = (src / "params.yaml").read_text()
    assert text.count("    r: 32\n") == 1
    (src / "params.yaml").write_text(text.replace("    r: 32\n", "    r: 8\n"))
    _git(src, "commit", "-q", "-am", "train.lora.r: 8")
    remote = work / "remote.git"
    _git(work, "clone", "-q", "--bare", str(src), str(remote))
    _git(src, "remote", "add", "origin", str(remote))
    # what the H100 job's rank 0 collects: a new dvc.lock and metrics, with a fact_recall regression
    job = work / "job"
    (job / "metrics").mkdir(parents=True)
    records, metrics = _regressed(json.loads((src / "metrics/eval_records.json").read_text()),
                                  json.loads((src / "metrics/eval.json").read_text()))
    (job / "metrics/eval.json").write_text(json.dumps(metrics, indent=2))
    (job / "metrics/eval_records.json").write_text(json.dumps(records))
    (job / "metrics/train.json").write_text(json.dumps({"eval_loss": 1.23, "model": "meta-llama/Llama-3.2-1B-Instruct"}))
    plots = job / "dvclive/train/plots/metrics/train"
    plots.mkdir(parents=True)
    (plots / "loss.tsv").write_text("step\tloss\n0\t2.5\n1\t1.2\n")
    (job / "dvc.lock").write_text((src / "dvc.lock").read_text() + "# trained on Azure ML (crafted)\n")
    return {"work": work, "src": src, "remote": remote, "job": job}


def _checkout(project, dest: Path) -> tuple[Path, str]:
    """What the workflow's actions/checkout of the PR head gives: a clone at the head, origin/main fetched."""
    _git(project["work"], "clone", "-q", str(project["remote"]), str(dest))
    _git(dest, "checkout", "-q", "pr")
    _git(dest, "config", "user.name", "github-actions[bot]")
    _git(dest, "config", "user.email", "41898282+github-actions[bot]@users.noreply.github.com")
    return dest, _git(dest, "rev-parse", "HEAD")


def _pull(sha: str, *, head_repo: str = REPO, author: str = "alice", state: str = "open") -> dict:
    return {"number": 7, "state": state, "user": {"login": author},
            "head": {"sha": sha, "ref": "pr", "repo": {"full_name": head_repo}},
            "base": {"ref": "main", "repo": {"full_name": REPO}}}


def _comment_event(login: str = "maint", body: str = "/train", association: str = "MEMBER") -> dict:
    return {"action": "created", "issue": {"number": 7, "pull_request": {"url": "x"}},
            "comment": {"body": body, "user": {"login": login}, "author_association": association},
            "sender": {"login": login}}


def _label_event(pull: dict, login: str = "maint", label: str = "train") -> dict:
    return {"action": "labeled", "label": {"name": label}, "pull_request": pull, "sender": {"login": login}}


# ---------------------------------------------------------------- the /train loop

def test_train_request_submits_reports_progress_commits_results_and_compares(project, tmp_path):
    checkout, head = _checkout(project, tmp_path / "pr-head")
    github = FakeGitHub({7: _pull(head)}, {"maint": "maintain", "alice": "write"})
    client = FakeMLClient(["Queued", "Running", "Completed"], project["job"])
    state_file, out = tmp_path / "state.json", tmp_path / "gh_output"
    event = tmp_path / "event.json"
    event.write_text(json.dumps(_comment_event()))

    def cli(*args):
        return pt.main(["--repo", REPO, *args], github=github, ml_client=client)

    assert cli("authorize", "--event", str(event), "--event-name", "issue_comment", "--state", str(state_file),
               "--github-output", str(out)) == 0
    assert "decision=allowed" in out.read_text() and f"head_sha={head}" in out.read_text()
    assert "accepted" in github.body()

    assert cli("submit", "--state", str(state_file), "--repo-dir", str(checkout),
               "--out", str(tmp_path / "azure/train-job.yml")) == 0
    # the estimate is shown before anything is submitted, then the job is queued
    estimate_only = next(b for b in github.bodies if "**Estimate**" in b)
    assert "**Job:**" not in estimate_only and "accepted" in estimate_only
    assert " min, $" in estimate_only and "GPU memory" in estimate_only and "Standard_NC40ads_H100_v5" in estimate_only
    job = client.jobs.submitted   # stages.azure.jobs.submit_job: the PR's head, its code, the registered environment
    assert job.tags["git_commit"] == head and job.environment_variables["GIT_COMMIT"] == head
    assert (tmp_path / "azure" / job.code).resolve() == checkout.resolve()   # relative to the spec
    env_spec = yaml.safe_load((tmp_path / "azure/train-environment.yml").read_text())
    assert job.environment == f"{env_spec['name']}:{env_spec['version']}"   # the registered build
    assert "kv-pr.vault.azure.net" in job.environment_variables["AZURE_KEY_VAULT_URL"]
    assert "⏳ queued on Azure ML" in github.body() and "`job-42`" in github.body()

    assert cli("status", "--state", str(state_file)) == 0     # Queued: no change, no new comment version
    versions = len(github.bodies)
    assert cli("status", "--state", str(state_file)) == 0     # Running
    assert "🏃 running on Azure ML" in github.body() and len(github.bodies) == versions + 1
    assert cli("status", "--state", str(state_file), "--github-output", str(out)) == 0   # Completed
    assert "phase=completed" in out.read_text()
    timeline = github.body().split("**Timeline:**")[1].splitlines()[0]
    assert [p.split()[0] for p in timeline.split("; ")] == ["requested", "queued", "running", "completed"]

    assert cli("finish", "--state", str(state_file), "--repo-dir", str(checkout),
               "--results", str(tmp_path / "results")) == 0
    remote = project["remote"]
    tip = _git(remote, "rev-parse", "refs/heads/pr")
    assert tip != head and _git(remote, "rev-parse", f"{tip}^") == head   # a bot commit on top of the trained head
    assert sorted(_git(remote, "diff", "--name-only", head, tip).splitlines()) == [   # the results PR's paths only
        "dvc.lock", "dvclive/train/plots/metrics/train/loss.tsv", "metrics/eval.json", "metrics/eval_records.json",
        "metrics/train.json"]
    assert "github-actions[bot]" in _git(remote, "log", "-1", "--format=%an", tip)
    assert f"Training results for {head[:12]}" in _git(remote, "log", "-1", "--format=%s", tip)
    body = github.body()
    assert "✅ done" in body and f"as `{tip[:12]}`" in body
    assert f"Real results: `meta-llama/Llama-3.2-1B-Instruct` trained on Azure ML for `{head[:12]}`" in body
    assert "Evaluation vs `origin/main`" in body and "`fact_recall`" in body and "❌ regression" in body
    assert "stale:" not in body
    if os.environ.get("PR_TRAIN_COMMENT"):   # to read the comment: PR_TRAIN_COMMENT=/tmp/c.md pytest ...
        Path(os.environ["PR_TRAIN_COMMENT"]).write_text(body)
    assert len([c for c in github.comments[7] if pt.MARKER in c["body"]]) == 1   # one comment, updated in place

    # a push to the PR after the run: the results are for the trained commit, and the comment says so
    src = project["src"]
    _git(src, "fetch", "-q", "origin")
    _git(src, "reset", "-q", "--hard", "origin/pr")
    (src / "params.yaml").write_text((src / "params.yaml").read_text().replace("    r: 8\n", "    r: 4\n"))
    _git(src, "commit", "-q", "-am", "train.lora.r: 4")
    _git(src, "push", "-q", "origin", "pr")
    new_head = _git(src, "rev-parse", "HEAD")
    github.pulls[7]["head"]["sha"] = new_head
    sync = tmp_path / "sync.json"
    sync.write_text(json.dumps({"action": "synchronize", "pull_request": github.pull(7)}))
    assert cli("mark-stale", "--event", str(sync)) == 0
    stale = github.body()
    assert f"stale: results are for `{head[:12]}`, the PR is at `{new_head[:12]}`" in stale
    assert "❌ regression" in stale   # the results stay visible, labelled with their commit
    state, _ = pt.parse_body(stale)
    assert state["head_sha"] == head and state["results_commit"] == tip
    assert pt.mark_stale(github, 7, tip) == "current"          # the bot commit itself is not a new revision
    assert "stale:" not in github.body()


def test_a_push_during_the_run_is_not_mixed_with_its_results(project, tmp_path):
    checkout, head = _checkout(project, tmp_path / "pr-head")
    github = FakeGitHub({7: _pull(head)}, {"maint": "write"})
    client = FakeMLClient(["Running", "Completed"], project["job"])
    decision = pt.authorize("issue_comment", _comment_event(), github)
    state = pt.record_request(github, decision)
    pt.submit(client, github, state, checkout, tmp_path / "azure/job.yml",
              estimate=lambda repo: ({"hours": 0.05, "cost_usd": 0.4, "nodes": 1, "vm_size": "Standard_NC40ads_H100_v5",
                                      "memory": {"total_gb": 4.5, "gpu_memory_gb": 94.0, "fits": True}}, None))
    github.pulls[7]["head"]["sha"] = "f" * 40          # someone pushed while the job ran
    assert pt.poll(client, github, state) == "running"
    assert f"stale: results are for `{head[:12]}`, the PR is at `{'f' * 12}`" in github.body()
    assert pt.poll(client, github, state) == "completed"
    before = _git(project["remote"], "rev-parse", "refs/heads/pr")
    state, _ = pt.finish(client, github, state, checkout, tmp_path / "results")
    assert _git(project["remote"], "rev-parse", "refs/heads/pr") == before      # nothing pushed
    assert _git(checkout, "rev-parse", "HEAD") == head                         # nothing committed either
    assert "results_commit" not in state and "the PR moved to `ffffffffffff`" in state["not_committed"]
    assert "**Not committed:**" in github.body() and "stale: results are for" in github.body()


def test_a_failed_job_says_why_and_the_status_command_fails(project, tmp_path):
    checkout, head = _checkout(project, tmp_path / "pr-head")
    github = FakeGitHub({7: _pull(head)}, {"maint": "admin"})
    client = FakeMLClient(["Queued", "error", "error", "Failed"], project["job"])
    state = pt.record_request(github, pt.authorize("pull_request_target", _label_event(_pull(head)), github))
    assert state["trigger"] == "`train` label"
    pt.submit(client, github, state, checkout, tmp_path / "azure/job.yml", estimate=lambda repo: (None, "no data"))
    assert "Estimate unavailable: no data" in github.body()
    state_file = tmp_path / "state.json"
    pt._save_state(state_file, state)
    rc = pt.main(["status", "--state", str(state_file), "--follow", "--interval", "0"], github=github, ml_client=client)
    assert rc == 1
    body = github.body()
    assert "❌ failed: Azure ML status Failed: UserError: CUDA out of memory" in body and "stack" not in body
    assert json.loads(state_file.read_text())["phase"] == "failed"


# ---------------------------------------------------------------- who may ask

def test_forks_dependabot_and_readers_are_refused_with_a_comment_saying_why(project):
    sha = "a" * 40
    fork = FakeGitHub({7: _pull(sha, head_repo="mallory/llama")}, {"maint": "admin"})
    decision = pt.authorize("issue_comment", _comment_event(), fork)
    assert decision["decision"] == "refused" and "fork (mallory/llama)" in decision["reason"]
    pt.record_request(fork, decision)
    assert "⛔ **Refused**" in fork.body() and "forks never train here" in fork.body()
    labelled = pt.authorize("pull_request_target", _label_event(_pull(sha, head_repo="mallory/llama")), fork)
    assert labelled["decision"] == "refused" and "fork" in labelled["reason"]

    bot = FakeGitHub({7: _pull(sha, author="dependabot[bot]")}, {"maint": "admin", "dependabot[bot]": "write"})
    decision = pt.authorize("issue_comment", _comment_event(), bot)
    assert decision["decision"] == "refused" and "Dependabot" in decision["reason"]
    as_actor = pt.authorize("pull_request_target", _label_event(_pull(sha), login="dependabot[bot]"), bot)
    assert as_actor["decision"] == "refused" and "Dependabot" in as_actor["reason"]

    readers = FakeGitHub({7: _pull(sha)}, {"randy": "read"})
    decision = pt.authorize("issue_comment", _comment_event("randy", association="CONTRIBUTOR"), readers)
    assert decision["decision"] == "refused" and "`read`" in decision["reason"] and "no write access" in decision["reason"]
    # the permission API is authoritative; author_association stands in only when it cannot answer
    assert pt.authorize("issue_comment", _comment_event("carol", association="COLLABORATOR"), readers)["decision"] == "allowed"
    assert pt.authorize("issue_comment", _comment_event("dave", association="NONE"), readers)["decision"] == "refused"
    # not a request at all: no comment
    assert pt.authorize("issue_comment", _comment_event(body="please /train"), readers)["decision"] == "ignored"
    assert pt.authorize("pull_request_target", _label_event(_pull(sha), label="bug"), readers)["decision"] == "ignored"
    issue_only = _comment_event()
    issue_only["issue"].pop("pull_request")
    assert pt.authorize("issue_comment", issue_only, readers)["decision"] == "ignored"


def test_a_refusal_keeps_the_results_of_an_earlier_run(tmp_path):
    github = FakeGitHub({7: _pull("b" * 40)}, {"maint": "write", "randy": "read"})
    state = {"pr": 7, "repo": REPO, "head_sha": "b" * 40, "head_ref": "pr", "requester": "maint",
             "trigger": "`/train` comment", "job": "job-1", "phase": "done", "history": [],
             "results_commit": "c" * 40, "results_files": ["dvc.lock"]}
    pt.write_comment(github, state, "### Real results\n| `rouge_l` | 0.5 |")
    pt.record_request(github, pt.authorize("issue_comment", _comment_event("randy", association="NONE"), github))
    body = github.body()
    assert "### Real results" in body and "✅ done" in body and "was refused" in body
    assert pt.parse_body(body)[0]["job"] == "job-1"
    assert pt.mark_stale(FakeGitHub({7: _pull("d" * 40)}), 7, "d" * 40) == "no run"


def test_the_state_survives_the_comment_round_trip():
    state = {"pr": 7, "head_sha": "e" * 40, "job": "x", "note": "a --> b -- c", "phase": "queued", "history": []}
    body = pt.render(state, "e" * 40, "eval\n-->")
    assert body.count("-->") >= 2 and pt.parse_body(body)[0] == state
    assert body.splitlines()[0] == pt.MARKER


def test_the_train_job_reads_the_request_from_the_comment_and_refuses_a_replaced_one(tmp_path):
    """pr-train.yml's train job runs after the authorize job: no state file, the state is the comment's."""
    github = FakeGitHub({7: _pull("a" * 40)}, {"maint": "write"})
    pt.record_request(github, pt.authorize("issue_comment", _comment_event(), github))
    state = pt.load_state(tmp_path / "absent.json", github, 7, "a" * 40)
    assert state["phase"] == "accepted" and state["head_sha"] == "a" * 40 and state["head_ref"] == "pr"
    with pytest.raises(pt.PRTrainError, match="a newer request replaced this one"):
        pt.load_state(tmp_path / "absent.json", github, 7, "b" * 40)
    with pytest.raises(pt.PRTrainError, match="run authorize first"):
        pt.load_state(tmp_path / "absent.json", FakeGitHub({7: _pull("a" * 40)}), 7, "a" * 40)
    # the command line: an error is one line and exit 1, and nothing is submitted
    client = FakeMLClient(["Queued"], tmp_path)
    rc = pt.main(["submit", "--state", str(tmp_path / "absent.json"), "--repo-dir", str(tmp_path),
                  "--pr", "7", "--head-sha", "b" * 40], github=github, ml_client=client)
    assert rc == 1 and client.jobs.submitted is None


def test_a_second_request_while_a_run_is_in_progress_is_refused_and_does_not_replace_it(tmp_path):
    github = FakeGitHub({7: _pull("a" * 40)}, {"maint": "write"})
    first = pt.record_request(github, pt.authorize("issue_comment", _comment_event(), github))
    pt.record_request(github, pt.authorize("issue_comment", _comment_event(), github))   # before the job exists
    assert pt.load_state(tmp_path / "absent.json", github, 7, "a" * 40)["phase"] == "accepted"   # the first still stands
    first.update(job="job-1", phase="running")
    pt.write_comment(github, first)
    second = pt.authorize("issue_comment", _comment_event(), github)
    assert second["decision"] == "refused" and "a run is in progress for `aaaaaaaaaaaa`" in second["reason"]
    pt.record_request(github, second)
    state, _ = pt.parse_body(github.body())
    assert state["job"] == "job-1" and state["phase"] == "running" and "was refused" in github.body()
    # a run that has not reported for longer than the train job can live is dead: a new request may start
    state["history"][-1][1] = "2020-01-01 00:00 UTC"
    pt.write_comment(github, state)
    assert pt.authorize("issue_comment", _comment_event(), github)["decision"] == "allowed"
