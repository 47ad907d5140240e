"""infra.yml's logic: the what-if pull-request comment, and the deployment outputs turned into the
settings the other workflows and DVC read.

    python -m stages.ci.infra_report whatif --input whatif.txt --env dev --out whatif.md [--status failed]
    python -m stages.ci.infra_report outputs --input outputs.json [--github-env FILE] [--dvc-commands]
    python -m stages.ci.infra_report live-deployment --input traffic.json

`live-deployment` reads the endpoint's traffic map (`az resource show ... --query properties.traffic`)
and prints the deployment that carries the most traffic: the one autoscale must target
(infra/*.bicepparam read it from AUTOSCALE_DEPLOYMENT); nothing when there is none yet.

`outputs` reads `az deployment group show -g RG -n NAME --query properties.outputs` (or the
`create` result) and prints the GitHub environment variables to set (AZURE_CLIENT_ID, ...), and
with --dvc-commands the `dvc remote modify` lines for .dvc/config.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

MARKER_PREFIX = "<!-- llama-finetune:infra-whatif"
MAX_BODY = 60_000
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Bicep output -> GitHub environment variable read by the workflows.
OUTPUT_TO_VARIABLE = {
    "ciIdentityClientId": "AZURE_CLIENT_ID",
    "tenantId": "AZURE_TENANT_ID",
    "subscriptionId": "AZURE_SUBSCRIPTION_ID",
    "resourceGroupName": "AZURE_RESOURCE_GROUP",
    "workspaceName": "AZURE_WORKSPACE_NAME",
    "storageAccountName": "DVC_STORAGE_ACCOUNT",
}
PR_OUTPUT_TO_VARIABLE = {"prIdentityClientId": "AZURE_CLIENT_ID"}


class InfraReportError(ValueError):
    pass


def marker(env: str) -> str:
    return f"{MARKER_PREFIX}:{env} -->"


def summarize_whatif(text: str) -> dict[str, int]:
    """Counts of the change symbols in `az deployment group what-if` text output."""
    counts = {"create": 0, "delete": 0, "modify": 0, "deploy": 0, "nochange": 0, "ignore": 0}
    m = re.search(r"Resource changes:\s*(.+?)\.\s*$", text, re.M)
    if m:
        for number, word in re.findall(r"(\d+) (?:to )?(create|delete|modify|deploy|no change|ignore)", m.group(1)):
            counts[word.replace(" ", "")] = int(number)
    return counts


def whatif_comment(text: str, env: str, status: str = "ok", run_url: str | None = None) -> str:
    clean = ANSI.sub("", text or "").strip()
    lines = [marker(env), f"## 🏗️ Bicep what-if: `{env}`"]
    if status == "skipped":
        lines.append(f"⚪ Skipped: {clean or 'no Azure credentials for this pull request'}.")
        return "\n".join(lines) + "\n"
    if status == "failed":
        lines.append("❌ **what-if failed** (the template does not build, or the deployment would be rejected):")
    else:
        counts = summarize_whatif(clean)
        changes = ", ".join(f"{n} to {k}" for k, n in counts.items() if n and k not in ("nochange", "ignore"))
        lines.append(f"Merging deploys these changes to `{env}`: **{changes or 'no change'}**"
                     + (f" ({counts['nochange']} unchanged)" if counts["nochange"] else "") + ".")
        if counts["delete"]:
            lines.append("⚠️ **Resources would be deleted**: check before merging.")
    body = clean if len(clean) <= MAX_BODY else clean[:MAX_BODY] + "\n… (cut; full output in the workflow log)"
    lines += ["", "<details><summary>what-if output</summary>", "", "```text", body.replace("```", "ʼʼʼ"), "```",
              "", "</details>"]
    if run_url:
        lines.append(f"\n[workflow run]({run_url})")
    return "\n".join(lines) + "\n"


def load_outputs(text: str) -> dict[str, str]:
    """{name: value} from `--query properties.outputs` ({"x": {"type", "value"}}) or a whole deployment."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InfraReportError(f"deployment outputs are not JSON: {exc}") from None
    if isinstance(data, dict) and "properties" in data and isinstance(data["properties"], dict):
        data = data["properties"].get("outputs") or {}
    if not isinstance(data, dict) or not data:
        raise InfraReportError("no deployment outputs found (expected properties.outputs of the deployment)")
    out = {}
    for name, entry in data.items():
        value = entry.get("value") if isinstance(entry, dict) else entry
        if value is not None:
            out[name] = value
    return out


def variables_for(outputs: dict[str, str], pull_request: bool = False) -> dict[str, str]:
    mapping = dict(OUTPUT_TO_VARIABLE)
    if pull_request:
        mapping.update(PR_OUTPUT_TO_VARIABLE)
        mapping.pop("ciIdentityClientId")
    missing = [k for k in mapping if k not in outputs]
    if missing:
        raise InfraReportError(f"deployment outputs lack {', '.join(missing)}: deployed from an older infra/main.bicep?")
    return {var: str(outputs[key]) for key, var in mapping.items()}


def dvc_commands(outputs: dict[str, str], remote: str = "azure") -> list[str]:
    """The commands that point the DVC remote at the deployed storage and make it the default:
    the committed .dvc/config has no default remote until then, so a fresh clone's `dvc exp run`
    never waits on Azure credentials. Commit .dvc/config after running them."""
    for key in ("dvcContainerName", "storageAccountName"):
        if key not in outputs:
            raise InfraReportError(f"deployment outputs lack {key}")
    return [f"dvc remote add --force --default {remote} azure://{outputs['dvcContainerName']}",
            f"dvc remote modify {remote} account_name {outputs['storageAccountName']}"]


def live_deployment(traffic) -> str:
    """The deployment with the largest traffic share ('' when none carries traffic)."""
    if not isinstance(traffic, dict):
        return ""
    shares = {str(k): v for k, v in traffic.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0}
    if not shares:
        return ""
    return sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ci.infra_report", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("whatif", help="the what-if pull-request comment")
    w.add_argument("--input", required=True, help="what-if text output ('-' = stdin)")
    w.add_argument("--env", required=True)
    w.add_argument("--status", choices=["ok", "failed", "skipped"], default="ok")
    w.add_argument("--run-url", default=None)
    w.add_argument("--out", default="-")
    o = sub.add_parser("outputs", help="GitHub variables and dvc remote commands from deployment outputs")
    o.add_argument("--input", required=True, help="outputs JSON ('-' = stdin)")
    o.add_argument("--pull-request", action="store_true", help="variables of the read-only pull-request environment")
    o.add_argument("--github-env", default=None, help="append NAME=value lines to this file ($GITHUB_ENV)")
    o.add_argument("--dvc-commands", action="store_true", help="also print the dvc remote commands")
    t = sub.add_parser("live-deployment", help="the deployment carrying the most endpoint traffic")
    t.add_argument("--input", required=True, help="traffic JSON, e.g. {\"blue\": 100} ('-' = stdin; empty = none)")
    args = parser.parse_args(argv)
    try:
        if args.input == "-":
            text = sys.stdin.read()
        else:
            path = Path(args.input)
            if not path.is_file():
                raise InfraReportError(f"{path} not found")
            text = path.read_text(encoding="utf-8", errors="replace")
        if args.command == "live-deployment":
            try:
                traffic = json.loads(text) if text.strip() else {}
            except json.JSONDecodeError as exc:
                raise InfraReportError(f"traffic is not JSON: {exc}") from None
            print(live_deployment(traffic))
            return 0
        if args.command == "whatif":
            body = whatif_comment(text, args.env, args.status, args.run_url)
            if args.out == "-":
                sys.stdout.write(body)
            else:
                Path(args.out).write_text(body, encoding="utf-8")
            return 0
        outputs = load_outputs(text)
        variables = variables_for(outputs, args.pull_request)
        for name, value in variables.items():
            print(f"gh variable set {name} --env <environment> --body '{value}'")
        if args.github_env:
            with open(args.github_env, "a", encoding="utf-8") as fh:
                fh.writelines(f"{name}={value}\n" for name, value in variables.items())
        if args.dvc_commands:
            print("\n".join(dvc_commands(outputs)))
        return 0
    except InfraReportError as exc:
        print(f"[infra_report] {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
