"""After an Azure ML training run: put the new dvc.lock and metrics on a branch and open a pull
request, so git records which model was trained from which data, params and code.

    python -m stages.ci.results_pr --source-sha "$GITHUB_SHA" --run-url "$RUN_URL" [--dry-run]

Commits only the result paths (default: dvc.lock, metrics/, dvclive/) that changed; with no
change it says so and exits 0. Without --dry-run it pushes the branch and runs
`gh pr create` (GH_TOKEN). --dry-run prints the plan and changes nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

DEFAULT_PATHS = ("dvc.lock", "metrics", "dvclive")


class ResultsError(RuntimeError):
    pass


def git(args: list[str], cwd: str | Path, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ResultsError(f"git {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def changed_result_files(paths: list[str], cwd: str | Path) -> list[str]:
    """Modified or new files under the result paths (porcelain status, untracked included)."""
    existing = [p for p in paths if (Path(cwd) / p).exists()]
    if not existing:
        return []
    out = git(["status", "--porcelain", "--untracked-files=all", "--", *existing], cwd)
    files = []
    for line in out.splitlines():
        name = line[3:].strip()
        if " -> " in name:
            name = name.split(" -> ", 1)[1]
        files.append(name.strip('"'))
    return sorted(files)


def pr_body(files: list[str], source_sha: str, run_url: str | None, metrics_summary: str | None) -> str:
    lines = [f"Training on Azure ML for `{source_sha[:12]}` finished. This pull request records what it produced:",
             "", *[f"- `{f}`" for f in files], ""]
    if metrics_summary:
        lines += [metrics_summary, ""]
    if run_url:
        lines.append(f"Workflow run: {run_url}")
    lines.append("Merging it triggers deploy.yml (quality gate, then blue/green rollout after a reviewer approves `prod`).")
    return "\n".join(lines)


def gate_line(metrics_path: Path) -> str | None:
    import json

    try:
        gate = json.loads(metrics_path.read_text(encoding="utf-8")).get("gate") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(gate.get("passed"), bool):
        return None
    reasons = "; ".join(str(r) for r in gate.get("reasons") or [])
    return "Quality gate: **passed**." if gate["passed"] else f"Quality gate: **failed** ({reasons})."


def commit_steps(files: list[str], message: str) -> list[list[str]]:
    """Stage exactly the result files and commit them (the results PR and stages.ci.pr_train's bot commit)."""
    return [["git", "add", "--", *files],
            ["git", "commit", "-m", message]]


def plan(files: list[str], branch: str, base: str, title: str, body_file: str) -> list[list[str]]:
    return [["git", "checkout", "-B", branch],
            *commit_steps(files, title),
            ["git", "push", "--force", "origin", f"HEAD:refs/heads/{branch}"],
            ["gh", "pr", "create", "--base", base, "--head", branch, "--title", title, "--body-file", body_file]]


def run_steps(steps: list[list[str]], cwd: str | Path, dry_run: bool = False, prefix: str = "[results_pr] ") -> None:
    """Run each command in order (or print it, dry_run); the first failure raises ResultsError."""
    for step in steps:
        print(prefix + ("would run: " if dry_run else "") + " ".join(step))
        if not dry_run:
            proc = subprocess.run(step, cwd=cwd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ResultsError(f"{' '.join(step[:3])} failed: {(proc.stderr or proc.stdout).strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ci.results_pr", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source-sha", required=True, help="the commit that was trained")
    parser.add_argument("--run-url", default=None)
    parser.add_argument("--base", default="main")
    parser.add_argument("--branch", default=None, help="default: train-results/<short sha>")
    parser.add_argument("--paths", nargs="+", default=list(DEFAULT_PATHS))
    parser.add_argument("--metrics", default="metrics/eval.json")
    parser.add_argument("--repo", default=".")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; no commit, push or pull request")
    args = parser.parse_args(argv)
    try:
        files = changed_result_files(args.paths, args.repo)
        if not files:
            print(f"[results_pr] no change under {', '.join(args.paths)}: nothing to record")
            return 0
        branch = args.branch or f"train-results/{args.source_sha[:12]}"
        title = f"Training results for {args.source_sha[:12]}"
        body_path = Path(args.repo) / "build" / "results-pr.md"
        body_path.parent.mkdir(parents=True, exist_ok=True)
        body_path.write_text(pr_body(files, args.source_sha, args.run_url, gate_line(Path(args.repo) / args.metrics)),
                             encoding="utf-8")
        run_steps(plan(files, branch, args.base, title, str(body_path)), args.repo, args.dry_run)
        return 0
    except ResultsError as exc:
        print(f"[results_pr] {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
