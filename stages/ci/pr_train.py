"""Real training on request, inside a pull request: `/train` (or the `train` label) submits the Azure ML
H100 job for the PR's head commit, reports its progress in ONE comment, commits the job's dvc.lock and
metrics/ to the PR branch, and shows the real paired comparison against the base branch's metrics.

    python -m stages.ci.pr_train authorize --event "$GITHUB_EVENT_PATH" --event-name "$GITHUB_EVENT_NAME" \
        --state build/pr-train/state.json --github-output "$GITHUB_OUTPUT"
    python -m stages.ci.pr_train submit   --state build/pr-train/state.json --repo-dir pr-head \
        [--pr N --head-sha SHA]     # no state file (another job): the state from the PR's comment
    python -m stages.ci.pr_train status   --state build/pr-train/state.json [--follow --interval 60]
    python -m stages.ci.pr_train finish   --state build/pr-train/state.json --repo-dir pr-head [--base main]
    python -m stages.ci.pr_train mark-stale --event "$GITHUB_EVENT_PATH"

Who may ask: someone with write access (the GitHub permission API says admin, maintain or write; when it
cannot answer, a comment's author_association OWNER/MEMBER/COLLABORATOR stands in). Never a fork (head
repo != base repo: its code would run with this repository's Azure identity and a token that pushes) and
never Dependabot: those are refused with a comment that says why.

The comment carries a hidden marker (its first line) and, on its second line, the run's state as JSON:
the head sha the run trains, the job, its phase, the bot commit. Every write re-reads the PR's head, so
the comment says "stale: results are for <sha>, the PR is at <sha>" as soon as the PR moved, whoever
writes it (a status update, finish, or mark-stale on a push). Results are committed to the PR branch
only when the branch is still at the trained commit (and the push is a fast-forward): a dvc.lock is
never put on top of code it was not produced from.

The Azure calls go through stages.azure.jobs (submit_job, job_status, failure_reason,
download_results): the same code path as train.yml's `python -m stages.azure.jobs submit`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from stages.ci import github_comment, results_pr
from stages.ci.pr_comment.common import _cell, _load_json, _run, resolve_base
from stages.ci.pr_comment.estimate import compute_estimate, estimate_section

MARKER = "<!-- llama-finetune:pr-train -->"
STATE_PREFIX = "<!-- pr-train-state: "
EVAL_START, EVAL_END = "<!-- pr-train:evaluation -->", "<!-- /pr-train:evaluation -->"
COMMAND = "/train"
LABEL = "train"
WRITE_PERMISSIONS = ("admin", "maintain", "write")
WRITE_ASSOCIATIONS = ("OWNER", "MEMBER", "COLLABORATOR")
DEPENDABOT = "dependabot[bot]"
# What the bot commit records: the results PR's paths. dvc.lock and metrics/, and dvclive/ too: the train
# stage's plots are a git-tracked output whose hash is in dvc.lock, so leaving them out would make the merged
# dvc.lock disagree with its own outputs and train.yml would train again.
RESULT_PATHS = results_pr.DEFAULT_PATHS
PHASE_LINES = {"accepted": "⏳ accepted: estimating and submitting", "queued": "⏳ queued on Azure ML",
               "running": "🏃 running on Azure ML", "completed": "✅ the job completed: fetching its results",
               "done": "✅ done", "failed": "❌ failed", "refused": "⛔ refused", "unknown": "❔ unknown status"}


class PRTrainError(RuntimeError):
    pass


# ---------------------------------------------------------------- GitHub (REST; a fake in the tests)

class RestGitHub:
    """The few GitHub REST calls this needs, on GITHUB_TOKEN (stages.ci.github_comment's transport)."""

    def __init__(self, repo: str, token: str, api: str = github_comment.DEFAULT_API):
        self.repo, self.token, self.api = repo, token, api.rstrip("/")

    def pull(self, number: int) -> dict:
        return github_comment._request("GET", f"{self.api}/repos/{self.repo}/pulls/{number}", self.token)

    def permission(self, user: str) -> str:
        answer = github_comment._request("GET", f"{self.api}/repos/{self.repo}/collaborators/{user}/permission",
                                         self.token)
        return str((answer or {}).get("permission") or "none")

    def find_comment(self, pr: int) -> dict | None:
        return github_comment.find_comment(self.api, self.repo, pr, MARKER, self.token)

    def upsert_comment(self, pr: int, body: str) -> None:
        github_comment.upsert_comment(self.api, self.repo, pr, body, self.token, MARKER)


def github_from_env(repo: str | None = None) -> RestGitHub:
    repo = repo or os.environ.get("GITHUB_REPOSITORY", "")
    token = os.environ.get("GITHUB_TOKEN") or os.environ.get("GH_TOKEN")
    if not repo or "/" not in repo:
        raise PRTrainError("--repo OWNER/NAME is required (or set GITHUB_REPOSITORY)")
    if not token:
        raise PRTrainError("GITHUB_TOKEN is not set")
    return RestGitHub(repo, token, os.environ.get("GITHUB_API_URL", github_comment.DEFAULT_API))


# ---------------------------------------------------------------- who may ask

def _request_of(event_name: str, event: dict) -> dict | None:
    """(pr, requester, association, trigger, pull or None) of a /train comment or a `train` label; None
    when the event asks for nothing."""
    if event_name == "issue_comment":
        issue, comment = event.get("issue") or {}, event.get("comment") or {}
        words = str(comment.get("body") or "").strip().split()
        if event.get("action") != "created" or not issue.get("pull_request") or not words or words[0] != COMMAND:
            return None
        return {"pr": int(issue["number"]), "requester": (comment.get("user") or {}).get("login", ""),
                "association": comment.get("author_association"), "trigger": f"`{COMMAND}` comment", "pull": None}
    if event_name in ("pull_request", "pull_request_target"):
        if event.get("action") != "labeled" or (event.get("label") or {}).get("name") != LABEL:
            return None
        pull = event.get("pull_request") or {}
        return {"pr": int(pull["number"]), "requester": (event.get("sender") or {}).get("login", ""),
                "association": None, "trigger": f"`{LABEL}` label", "pull": pull}
    return None


def authorize(event_name: str, event: dict, github) -> dict:
    """{"decision": allowed | refused | ignored, "reason", "pr", "head_sha", "head_ref", "requester", ...}."""
    request = _request_of(event_name, event)
    if request is None:
        return {"decision": "ignored", "reason": f"not a `{COMMAND}` comment or a `{LABEL}` label on a pull request"}
    pull = request.pop("pull") or github.pull(request["pr"])
    head, base = pull.get("head") or {}, pull.get("base") or {}
    head_repo = ((head.get("repo") or {}).get("full_name")) or "a deleted fork"
    base_repo = (base.get("repo") or {}).get("full_name") or ""
    result = {**request, "head_sha": head.get("sha", ""), "head_ref": head.get("ref", ""), "base_ref": base.get("ref", ""),
              "repo": base_repo, "author": (pull.get("user") or {}).get("login", "")}
    requester = request["requester"]

    def refuse(reason: str) -> dict:
        return {**result, "decision": "refused", "reason": reason}

    if head_repo != base_repo:
        return refuse(f"this pull request comes from a fork ({head_repo}). Training would run its code with this "
                      f"repository's Azure identity and push with a token that can write; forks never train here. "
                      f"A maintainer can push the branch to {base_repo} and ask again there.")
    if DEPENDABOT in (requester, result["author"], (event.get("sender") or {}).get("login")):
        return refuse("Dependabot pull requests never train on Azure: they get no Azure identity and no write "
                      "token. Merge it, or copy the change to a branch of a maintainer, and train there.")
    if pull.get("state", "open") != "open":
        return refuse("the pull request is closed.")
    try:
        permission = github.permission(requester)
        source = f"the GitHub permission API says `{permission}`"
        allowed = permission in WRITE_PERMISSIONS
    except Exception as exc:  # noqa: BLE001 - fall back to the comment's association, never to "yes"
        association = request.get("association")
        source = f"the permission check failed ({exc}); author_association `{association}`"
        allowed = association in WRITE_ASSOCIATIONS
    if not allowed:
        return refuse(f"@{requester} has no write access to this repository ({source}). Training on Azure costs "
                      f"money: a maintainer (write access) asks for it with a `{COMMAND}` comment or the "
                      f"`{LABEL}` label.")
    running = in_progress(existing(github, request["pr"])[0])
    if running:
        return refuse(f"a run is in progress for `{str(running.get('head_sha'))[:12]}` (job `{running.get('job') or '?'}`, "
                      f"{running.get('phase')}). Ask again when it has finished: two runs never write one comment.")
    return {**result, "decision": "allowed", "reason": f"@{requester} has write access ({source})"}


ACTIVE_PHASES = ("accepted", "queued", "running", "completed")
STALE_RUN_HOURS = 7.0   # longer than the train job's 6 h limit: a run not updated since then is dead


def in_progress(state: dict | None, now: datetime | None = None) -> dict | None:
    """The state when its run is still going (updated within STALE_RUN_HOURS), else None."""
    if not state or state.get("phase") not in ACTIVE_PHASES or not state.get("history"):
        return None
    try:
        last = datetime.strptime(state["history"][-1][1], "%Y-%m-%d %H:%M UTC").replace(tzinfo=timezone.utc)
    except (ValueError, TypeError, IndexError):
        return None
    age = ((now or datetime.now(timezone.utc)) - last).total_seconds() / 3600
    return state if age < STALE_RUN_HOURS else None


# ---------------------------------------------------------------- the comment

def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _state_line(state: dict) -> str:
    text = json.dumps(state, sort_keys=True, separators=(",", ":"))
    return STATE_PREFIX + text.replace("--", "-\\u002d") + " -->"


def parse_body(body: str) -> tuple[dict | None, str]:
    """(state, evaluation markdown) of a comment this module wrote; (None, "") otherwise."""
    state = None
    for line in body.splitlines():
        if line.startswith(STATE_PREFIX) and line.endswith(" -->"):
            try:
                state = json.loads(line[len(STATE_PREFIX):-4])
            except json.JSONDecodeError:
                state = None
            break
    evaluation = ""
    if EVAL_START in body and EVAL_END in body:
        evaluation = body.split(EVAL_START, 1)[1].split(EVAL_END, 1)[0].strip("\n")
    return state, evaluation


def stale_line(state: dict, pr_head: str | None) -> str:
    """Empty while the PR's head is the trained commit (or the bot commit on top of it)."""
    trained = state.get("head_sha") or ""
    if not pr_head or not trained or pr_head in (trained, state.get("results_commit")):
        return ""
    return (f"> ⚠️ **stale: results are for `{trained[:12]}`, the PR is at `{pr_head[:12]}`.** The commits "
            f"pushed since are not in this run, and nothing from it is committed on top of them. Comment "
            f"`{COMMAND}` again to train the current head.")


def estimate_headline(est: dict | None, error: str | None) -> str:
    if not est:
        return f"_Estimate unavailable: {_cell(error or 'unknown reason')}._"
    hours = est.get("hours")
    minutes = f"{hours * 60:.1f} min" if isinstance(hours, (int, float)) else "? min"
    cost = "unknown cost" if est.get("cost_usd") is None else f"${est['cost_usd']:,.2f}"
    mem = est.get("memory") or {}
    gpu_mem = (f"{mem['total_gb']:.1f} GiB of {mem.get('gpu_memory_gb', '?')} GiB GPU memory"
               + ("" if mem.get("fits") is None else (" (fits)" if mem["fits"] else " (**does not fit**)"))
               if isinstance(mem.get("total_gb"), (int, float)) else "GPU memory unknown")
    return (f"**Estimate** (before submitting; `stages.core.estimate.estimate_training`): {minutes}, {cost}, "
            f"{gpu_mem} on {est.get('nodes', 1)} × `{est.get('vm_size', '?')}`.")


def render(state: dict, pr_head: str | None, evaluation_md: str = "") -> str:
    """The whole comment from the state (and the evaluation markdown, kept between runs of this module)."""
    phase = state.get("phase", "unknown")
    lines = [MARKER, _state_line(state), "## 🦙 Training on Azure ML for this pull request"]
    stale = stale_line(state, pr_head)
    if stale:
        lines += ["", stale]
    if phase == "refused" and not state.get("job"):
        lines += ["", f"⛔ **Refused** ({_cell(state.get('trigger') or 'request')} by @{state.get('requester', '?')}): "
                      f"{_cell(state.get('reason', ''))}"]
        return "\n".join(lines) + "\n"
    sha = (state.get("head_sha") or "")[:12]
    lines += ["", f"Requested by @{state.get('requester', '?')} ({state.get('trigger', '?')}) for `{sha}` "
                  f"(the PR's head when asked); the job trains exactly that commit."]
    lines += ["", estimate_headline(state.get("estimate"), state.get("estimate_error"))]
    if state.get("estimate"):
        lines += ["", "<details><summary>Estimate details</summary>", "",
                  estimate_section(state["estimate"], None, None), "", "</details>"]
    status = PHASE_LINES.get(phase, phase)
    if phase == "failed":
        status += f": {_cell(state.get('failure') or 'no reason recorded')}"
    lines += ["", f"**Status:** {status}"]
    if state.get("job"):
        job = f"`{state['job']}`" + (f" ([Azure ML studio]({state['studio_url']}))" if state.get("studio_url") else "")
        lines.append(f"**Job:** {job}, Azure status `{state.get('azure_status', '?')}`")
    if state.get("history"):
        lines.append("**Timeline:** " + "; ".join(f"{p} {t}" for p, t in state["history"]))
    if phase == "done":
        if state.get("results_commit"):
            files = ", ".join(f"`{f}`" for f in state.get("results_files") or [])
            lines.append(f"**Committed** to `{state.get('head_ref')}` as `{state['results_commit'][:12]}` "
                         f"(bot commit on top of `{sha}`): {files}.")
        else:
            lines.append(f"**Not committed:** {_cell(state.get('not_committed') or 'no reason recorded')}")
    for note in state.get("notes") or []:
        lines.append(f"> {_cell(note)}")
    if evaluation_md:
        lines += ["", EVAL_START, evaluation_md, EVAL_END]
    lines += ["", f"<sub>Built by <code>python -m stages.ci.pr_train</code>; `{COMMAND}` (write access) asks "
                  f"again. A push marks these results stale.</sub>"]
    return "\n".join(lines) + "\n"


def write_comment(github, state: dict, evaluation_md: str = "", pr_head: str | None = None) -> str:
    """Render with the PR's current head (read now, so a push during the run shows as stale) and post."""
    if pr_head is None:
        pr_head = ((github.pull(state["pr"]).get("head") or {}).get("sha"))
    body = render(state, pr_head, evaluation_md)
    github.upsert_comment(state["pr"], body)
    return body


def existing(github, pr: int) -> tuple[dict | None, str]:
    comment = github.find_comment(pr)
    return parse_body(comment.get("body") or "") if comment else (None, "")


# ---------------------------------------------------------------- the steps

def record_request(github, decision: dict) -> dict:
    """authorize's outcome into the comment: a refusal never erases an earlier run's results (it becomes a
    note under them); an allowed request starts a new state."""
    if decision["decision"] == "allowed":
        state = {k: decision[k] for k in ("pr", "repo", "head_sha", "head_ref", "base_ref", "requester", "trigger")}
        state.update(phase="accepted", history=[["requested", _now()]])
        write_comment(github, state)
        return state
    old, evaluation = existing(github, decision["pr"])
    if old and (old.get("job") or in_progress(old)):
        old.setdefault("notes", []).append(f"{_now()}: a {decision['trigger']} by @{decision['requester']} "
                                           f"was refused: {decision['reason']}")
        write_comment(github, old, evaluation)
        return old
    state = {k: decision.get(k) for k in ("pr", "repo", "head_sha", "head_ref", "requester", "trigger", "reason")}
    state["phase"] = "refused"
    write_comment(github, state)
    return state


@contextlib.contextmanager
def _in_dir(path: Path):
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


ESTIMATE_KEYS = ("hours", "cost_usd", "nodes", "vm_size", "gpu", "gpus", "tokens_per_epoch", "epochs",
                 "expected_tokens_per_s", "throughput_basis", "price_usd_per_hour")


def estimate_for(repo_dir: Path) -> tuple[dict | None, str | None]:
    """stages.core.estimate.estimate_training of the PR head's params and data (it reads data/ relative to
    the working directory, hence the chdir); only the figures the comment shows."""
    with _in_dir(repo_dir):
        est, error = compute_estimate(Path("params.yaml"))
    if est is None:
        return None, error
    mem = est.get("memory") or {}
    return {**{k: est.get(k) for k in ESTIMATE_KEYS},
            "memory": {k: mem.get(k) for k in ("total_gb", "gpu_memory_gb", "fits")}}, None


def _git_head(repo_dir: Path) -> str:
    ok, out = _run(["git", "rev-parse", "HEAD"], repo_dir)
    if not ok:
        raise PRTrainError(f"{repo_dir} is not a git checkout: {out}")
    return out.strip()


def submit(client, github, state: dict, repo_dir: Path, out: Path, estimate=estimate_for) -> dict:
    """Estimate first (shown before anything is spent), then stages.azure.jobs.submit_job for the PR's head."""
    from stages.azure import jobs
    from stages.core.params import load_params

    repo_dir = Path(repo_dir)
    if _git_head(repo_dir) != state["head_sha"]:
        raise PRTrainError(f"{repo_dir} is at {_git_head(repo_dir)[:12]}, not the requested head "
                           f"{state['head_sha'][:12]}: check out the PR's head commit there")
    state["estimate"], state["estimate_error"] = estimate(repo_dir)
    write_comment(github, state)
    job = jobs.submit_job(client, load_params(repo_dir / "params.yaml"), Path(out), repo_root=repo_dir,
                          git_commit=state["head_sha"])
    state.update(job=job.name, studio_url=getattr(job, "studio_url", "") or "", phase="queued",
                 azure_status=str(getattr(job, "status", None) or "Queued"))
    state["history"].append(["queued", _now()])
    write_comment(github, state)
    return state


def poll(client, github, state: dict) -> str:
    """One look at the job; the comment is rewritten when its phase changes. Returns the phase."""
    from stages.azure import jobs

    status = jobs.job_status(client, state["job"])
    phase = jobs.status_phase(status)
    changed = phase != state.get("phase") or status != state.get("azure_status")
    state["azure_status"] = status
    if phase != state.get("phase"):
        state["phase"] = phase
        state["history"].append([phase, _now()])
        if phase == "failed":
            state["failure"] = f"Azure ML status {status}: {jobs.failure_reason(client, state['job'])}"
    if changed:
        write_comment(github, state)
    return phase


def follow(client, github, state: dict, interval_s: float = 60.0, timeout_s: float = 6 * 3600,
           sleep=time.sleep, clock=time.monotonic, max_errors: int = 5) -> str:
    """poll until the job completes or fails; a failed look (a transient Azure or GitHub error) is retried,
    and only max_errors in a row end the step (the job itself is not touched)."""
    deadline, errors = clock() + timeout_s, 0
    while True:
        try:
            phase = poll(client, github, state)
            errors = 0
        except Exception as exc:  # noqa: BLE001 - retried; the last one is raised
            errors += 1
            print(f"[pr_train] poll failed ({errors}/{max_errors}): {type(exc).__name__}: {exc}", file=sys.stderr)
            if errors >= max_errors:
                raise
            sleep(interval_s)
            continue
        if phase in ("completed", "failed"):
            return phase
        if clock() > deadline:
            state.setdefault("notes", []).append(f"{_now()}: stopped following after {timeout_s / 60:.0f} min; "
                                                 f"the job is still {state['azure_status']}")
            write_comment(github, state)
            return phase
        sleep(interval_s)


def evaluation_for(repo_dir: Path, base: str, sha: str, model: str | None) -> str:
    """The real results against the base branch's committed metrics: pr_comment's gate and paired evaluation
    sections, on the job's metrics/eval.json and metrics/eval_records.json."""
    from stages.ci.pr_comment.evaluation import _eval_comparison, _noise_floor, evaluation_section
    from stages.ci.pr_comment.gate import gate_section
    from stages.ci.pr_comment.params import _gate_params

    base_rev = resolve_base(base, repo_dir)
    base_label = base if base_rev is None else base_rev
    eval_metrics, problem = _load_json(repo_dir / "metrics/eval.json")
    lines = [f"### Real results: `{model or '?'}` trained on Azure ML for `{sha[:12]}`", "",
             gate_section(eval_metrics, problem)]
    if base_rev is None:
        lines += ["", f"_No comparison: base revision `{base}` not found in the checkout (fetch it)._"]
        return "\n".join(lines)
    regression_metrics, tolerance = _gate_params(repo_dir / "params.yaml")
    comparison, why = _eval_comparison(repo_dir, base_rev, base_label, "metrics/eval.json", eval_metrics,
                                       regression_metrics, tolerance)
    lines += ["", evaluation_section(comparison, eval_metrics, _noise_floor(repo_dir, base_rev), base_label,
                                     why or problem)]
    return "\n".join(lines)


def finish(client, github, state: dict, repo_dir: Path, results_dir: Path, base: str = "main",
           push: bool = True) -> tuple[dict, str]:
    """Fetch the job's dvc.lock and metrics into the PR head checkout, commit them as a bot commit on the PR
    branch (only when the branch is still at the trained commit, fast-forward only), and rewrite the
    comment with the real paired comparison against the base branch."""
    import yaml

    from stages.azure import jobs

    repo_dir = Path(repo_dir)
    if _git_head(repo_dir) != state["head_sha"]:
        raise PRTrainError(f"{repo_dir} is not at the trained commit {state['head_sha'][:12]}")
    applied = jobs.download_results(client, state["job"], Path(results_dir), repo_root=repo_dir)
    model = ((yaml.safe_load((repo_dir / "params.yaml").read_text(encoding="utf-8")) or {}).get("model") or {}).get("base")
    evaluation_md = evaluation_for(repo_dir, base, state["head_sha"], model)
    files = results_pr.changed_result_files(list(RESULT_PATHS), repo_dir)
    state["results_files"] = files
    pr_head = (github.pull(state["pr"]).get("head") or {}).get("sha")
    if not applied:
        state["not_committed"] = "the job's results output held no dvc.lock, metrics or plots"
    elif pr_head != state["head_sha"]:
        state["not_committed"] = (f"the PR moved to `{(pr_head or '?')[:12]}` while the job ran: a dvc.lock from "
                                  f"`{state['head_sha'][:12]}` is not committed on top of other code")
    elif not files:
        state["not_committed"] = f"{', '.join(RESULT_PATHS)} are already what the job produced"
    else:
        message = (f"Training results for {state['head_sha'][:12]} (Azure ML job {state['job']}): "
                   f"{', '.join(RESULT_PATHS)}\n\nRequested by @{state['requester']} ({state['trigger']}) on #{state['pr']}.")
        steps = results_pr.commit_steps(files, message)
        if push:   # never --force: a branch that moved meanwhile rejects the push
            steps.append(["git", "push", "origin", f"HEAD:refs/heads/{state['head_ref']}"])
        try:
            results_pr.run_steps(steps, repo_dir, prefix="[pr_train] ")
            state["results_commit"] = _git_head(repo_dir)
        except results_pr.ResultsError as exc:
            state["not_committed"] = f"the commit or push failed ({exc})"
    state["phase"] = "done"
    state["history"].append(["done", _now()])
    write_comment(github, state, evaluation_md)
    return state, evaluation_md


def mark_stale(github, pr: int, head_sha: str) -> str:
    """On a push: rewrite the comment with the new head (stale when it is not the results' commit).
    'stale' | 'current' | 'no run' (no comment of this module on the PR)."""
    state, evaluation = existing(github, pr)
    if not state or not state.get("job"):
        return "no run"
    write_comment(github, state, evaluation, pr_head=head_sha)
    return "stale" if stale_line(state, head_sha) else "current"


# ---------------------------------------------------------------- command line

def load_state(path: Path, github=None, pr: int | None = None, head_sha: str | None = None) -> dict:
    """The state file of an earlier step of this job; else (another job: --pr) the state in the PR's comment,
    which must be the request for --head-sha (a later request would have replaced it)."""
    data, problem = _load_json(Path(path))
    if data is None and github is not None and pr is not None:
        data, _ = existing(github, pr)
        problem = f"no {MARKER} comment with a state on #{pr}"
    if data is None:
        raise PRTrainError(f"no state: {problem} (run authorize first)")
    if data.get("phase") == "refused":
        raise PRTrainError(f"the request on #{data.get('pr')} was refused: {data.get('reason')}")
    if head_sha and data.get("head_sha") != head_sha:
        raise PRTrainError(f"the comment's run is for {str(data.get('head_sha'))[:12]}, not {head_sha[:12]}: "
                           "a newer request replaced this one")
    return data


def _save_state(path: Path, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _github_output(path: str | None, **values) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            for key, value in values.items():
                fh.write(f"{key}={value}\n")


def main(argv: list[str] | None = None, github=None, ml_client=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ci.pr_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=None, help="OWNER/NAME (default: $GITHUB_REPOSITORY)")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("authorize", help="may this event train? refused requests get a comment saying why")
    a.add_argument("--event", type=Path, required=True, help="the event JSON ($GITHUB_EVENT_PATH)")
    a.add_argument("--event-name", required=True, help="$GITHUB_EVENT_NAME")
    a.add_argument("--state", type=Path, required=True)
    a.add_argument("--github-output", default=None)
    a.add_argument("--no-comment", action="store_true", help="decide only (e.g. for the job summary)")
    s = sub.add_parser("submit", help="estimate, then submit the H100 job for the PR's head")
    s.add_argument("--state", type=Path, required=True)
    s.add_argument("--pr", type=int, default=None, help="without a state file: read the state from this PR's comment")
    s.add_argument("--head-sha", default=None, help="the head the request was for (checked against the state)")
    s.add_argument("--repo-dir", type=Path, required=True, help="checkout of the PR's head commit")
    s.add_argument("--out", type=Path, default=Path("build/pr-train/azure/train-job.yml"))
    t = sub.add_parser("status", help="poll the job and update the comment")
    t.add_argument("--state", type=Path, required=True)
    t.add_argument("--follow", action="store_true", help="poll until the job completes or fails")
    t.add_argument("--interval", type=float, default=60.0, help="seconds between polls")
    t.add_argument("--timeout-minutes", type=float, default=340.0)
    t.add_argument("--github-output", default=None)
    f = sub.add_parser("finish", help="commit dvc.lock + metrics/ to the PR branch; the real comparison")
    f.add_argument("--state", type=Path, required=True)
    f.add_argument("--repo-dir", type=Path, required=True)
    f.add_argument("--results", type=Path, default=Path("build/pr-train/results"))
    f.add_argument("--base", default="main")
    f.add_argument("--no-push", action="store_true", help="commit locally, do not push")
    m = sub.add_parser("mark-stale", help="on a push: say the results are for another commit")
    m.add_argument("--event", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "authorize":
            event = json.loads(args.event.read_text(encoding="utf-8"))
            github = github or github_from_env(args.repo)
            decision = authorize(args.event_name, event, github)
            print(f"[pr_train] {decision['decision']}: {decision['reason']}")
            if decision["decision"] != "ignored" and not args.no_comment:
                state = record_request(github, decision)
                if decision["decision"] == "allowed":
                    _save_state(args.state, state)
            _github_output(args.github_output, decision=decision["decision"], pr=decision.get("pr", ""),
                           head_sha=decision.get("head_sha", ""), base_ref=decision.get("base_ref", ""))
            return 0
        if args.command == "mark-stale":
            event = json.loads(args.event.read_text(encoding="utf-8"))
            pull = event.get("pull_request") or {}
            outcome = mark_stale(github or github_from_env(args.repo), int(pull["number"]), pull["head"]["sha"])
            print(f"[pr_train] #{pull['number']} at {pull['head']['sha'][:12]}: {outcome}")
            return 0
        github = github or github_from_env(args.repo)
        state = load_state(args.state, github, getattr(args, "pr", None), getattr(args, "head_sha", None))
        if ml_client is None:
            from stages.azure import config as az

            ml_client = az.ml_client(az.workspace_from_env())
        try:
            if args.command == "submit":
                submit(ml_client, github, state, args.repo_dir, args.out)
                print(f"[pr_train] submitted {state['job']} for {state['head_sha'][:12]}")
                return 0
            if args.command == "status":
                phase = (follow(ml_client, github, state, args.interval, args.timeout_minutes * 60) if args.follow
                         else poll(ml_client, github, state))
                _github_output(args.github_output, phase=phase)
                print(f"[pr_train] {state['job']}: {phase} ({state['azure_status']})")
                return 1 if phase == "failed" else 0
            state, _ = finish(ml_client, github, state, args.repo_dir, args.results, args.base, push=not args.no_push)
            print(f"[pr_train] done: " + (f"committed {state['results_commit'][:12]}" if state.get("results_commit")
                                          else f"not committed: {state.get('not_committed')}"))
            return 0
        except Exception as exc:
            from stages.core.params import ConfigError

            if isinstance(exc, (PRTrainError, ConfigError)) or type(exc).__module__.split(".")[0] in {"azure", "msrest"}:
                state["phase"], state["failure"] = "failed", f"{args.command}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                state.setdefault("history", []).append(["failed", _now()])
                with contextlib.suppress(Exception):
                    write_comment(github, state)
            raise
        finally:
            _save_state(args.state, state)
    except (PRTrainError, github_comment.GitHubError) as exc:
        print(f"[pr_train] {exc}", file=sys.stderr)
        return 1


def cli(argv: list[str] | None = None) -> int:
    """main() with stages.azure.config.run_cli's error handling (a configuration error: one line, exit 2;
    an Azure error: one line, exit 1), without importing it: authorize and mark-stale need only the
    standard library, so their workflow jobs skip `make setup`."""
    try:
        return main(argv)
    except Exception as exc:  # noqa: BLE001 - report, never dump, what run_cli reports
        top = type(exc).__module__.split(".")[0]
        if type(exc).__name__ == "ConfigError":
            print(f"[pr_train] configuration error: {exc}", file=sys.stderr)
            return 2
        if top in {"azure", "msrest", "requests", "urllib3"}:
            print(f"[pr_train] Azure error ({type(exc).__name__}): {str(exc).splitlines()[0] if str(exc) else ''}",
                  file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(cli())
