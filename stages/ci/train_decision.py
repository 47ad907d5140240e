"""Whether a merged commit needs training: train.yml trains only when dvc.lock is stale.

    python -m stages.ci.train_decision --json build/train-decision.json --github-output "$GITHUB_OUTPUT"

"current": dvc.lock already matches this commit's data, params and code (`dvc status`: no stage changed;
outputs that are only missing from this fresh checkout are not changes), and every output it records is
on the DVC remote (`dvc status --cloud`: nothing "missing" or only in a local cache). The model that was
reviewed is the one dvc.lock names, so train.yml does not train again; deploy.yml deploys it through
the gate, as after any results pull request.
"stale": anything else, with the reasons (a stage changed and why, outputs not on the remote, no
dvc.lock, a dvc call that failed). train.yml then trains on Azure ML as before.

The change detection is stages.ci.plan's (`changes`), so CI's "from the remote/run cache" and this
decision read `dvc status` the same way.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from .plan import changes, dvc_status

CURRENT, STALE = "current", "stale"
# `dvc status --cloud` states: "deleted" = on the remote, not in this checkout's cache (a fresh runner: fine);
# "new" = only in a local cache; "missing" = nowhere. Only the first leaves the remote complete.
NOT_ON_REMOTE = ("new", "missing")


def cloud_status(cwd: str | Path = ".", remote: str | None = None) -> dict:
    """`dvc status --cloud --json` against `remote` (the default remote when None)."""
    cmd = [sys.executable, "-m", "dvc", "status", "--cloud", "--json", *(["--remote", remote] if remote else [])]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc status --cloud failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip().startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def decide(status: dict, cloud: dict | None, dvc_yaml: dict, lock: dict | None, params_now: dict | None) -> dict:
    """The decision and its reasons, from `dvc status --json` and `dvc status --cloud --json` (None: the
    remote was not checked, which the reasons say and which makes the lock stale: nothing to deploy from)."""
    reasons: list[str] = []
    if not lock or not (lock.get("stages") or {}):
        reasons.append("no dvc.lock: nothing was trained for this commit")
    changed = changes(status, dvc_yaml, lock, params_now)
    for stage in dvc_yaml.get("stages") or {}:
        if stage in changed:
            reasons.append(f"{stage} changed ({'; '.join(changed[stage])})")
        elif lock and stage not in (lock.get("stages") or {}):
            reasons.append(f"{stage} is not in dvc.lock")
    if cloud is None:
        reasons.append("the DVC remote was not checked (--no-remote): the recorded outputs may not be there")
    else:
        absent = sorted(path for path, state in cloud.items() if state in NOT_ON_REMOTE)
        if absent:
            reasons.append(f"not on the DVC remote: {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
    decision = STALE if reasons else CURRENT
    summary = ("dvc.lock matches this commit's data, params and code, and its outputs are on the DVC remote: "
               "the reviewed model is the one to deploy; no training" if decision == CURRENT
               else "dvc.lock does not match this commit: train on Azure ML")
    return {"decision": decision, "summary": summary, "reasons": reasons, "changed": changed}


def decide_here(cwd: str | Path = ".", remote: str | None = None, check_remote: bool = True) -> dict:
    """decide() for the repository at `cwd`; a dvc call that fails makes the lock stale, with the error."""
    cwd = Path(cwd)
    dvc_yaml = yaml.safe_load((cwd / "dvc.yaml").read_text(encoding="utf-8")) or {}
    lock_path, params_path = cwd / "dvc.lock", cwd / "params.yaml"
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) if lock_path.is_file() else None
    params_now = yaml.safe_load(params_path.read_text(encoding="utf-8")) if params_path.is_file() else None
    try:
        status = dvc_status(cwd)
        cloud = cloud_status(cwd, remote) if check_remote else None
    except (RuntimeError, OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        return {"decision": STALE, "summary": "dvc could not tell: train on Azure ML", "reasons": [str(exc)],
                "changed": {}}
    return decide(status, cloud, dvc_yaml, lock, params_now)


def remote_from_params(params_path: str | Path = "params.yaml") -> str | None:
    """azure.storage.dvc_remote_name of params.yaml (the remote train.yml and the Azure job use)."""
    try:
        tree = yaml.safe_load(Path(params_path).read_text(encoding="utf-8")) or {}
        return ((tree.get("azure") or {}).get("storage") or {}).get("dvc_remote_name") or None
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ci.train_decision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--remote", default=None,
                        help="DVC remote to check (default: params.yaml azure.storage.dvc_remote_name)")
    parser.add_argument("--no-remote", action="store_true", help="do not check the remote (the lock is then stale)")
    parser.add_argument("--json", default=None, help="write the decision here")
    parser.add_argument("--github-output", default=None, help="append decision=current|stale ($GITHUB_OUTPUT)")
    args = parser.parse_args(argv)
    result = decide_here(".", args.remote or remote_from_params(), not args.no_remote)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if args.github_output:
        with open(args.github_output, "a", encoding="utf-8") as handle:
            handle.write(f"decision={result['decision']}\n")
    print(f"{result['decision']}: {result['summary']}")
    for reason in result["reasons"]:
        print(f"- {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
