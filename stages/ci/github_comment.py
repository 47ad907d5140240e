"""Create or update ONE pull-request comment, found by the hidden marker on its first line.

    python -m stages.ci.github_comment --repo OWNER/NAME --pr 12 --body-file comment.md

Every push to the pull request re-runs CI; this keeps a single comment current instead of adding
one per push. Uses the GitHub REST API with GITHUB_TOKEN (in Actions: `pull-requests: write`);
GITHUB_API_URL selects the API host (GitHub Enterprise, or a local server in the tests).
--dry-run prints what it would do without any network call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_API = "https://api.github.com"


class GitHubError(RuntimeError):
    pass


def marker_of(body: str, default: str | None = None) -> str:
    """The body's first line when it is an HTML comment (the marker), else `default`."""
    first = body.lstrip().splitlines()[0].strip() if body.strip() else ""
    if first.startswith("<!--") and first.endswith("-->"):
        return first
    if default:
        return default
    raise GitHubError("the comment body does not start with a hidden marker line like <!-- name --> "
                      "and no --marker was given: the comment could not be found again to update it")


def _request(method: str, url: str, token: str, payload: dict | None = None, timeout: float = 30.0):
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Accept": "application/vnd.github+json",
        "Authorization": f"Bearer {token}",
        "X-GitHub-Api-Version": "2022-11-28",
        "User-Agent": "llama-finetune-ci",
        **({"Content-Type": "application/json"} if data is not None else {}),
    })
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        hint = (" (a read-only token: pull requests from forks cannot comment; the report is in the job summary)"
                if exc.code in (403, 404) else "")
        raise GitHubError(f"{method} {url} -> HTTP {exc.code}{hint}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise GitHubError(f"{method} {url} failed: {exc}") from None
    return json.loads(body) if body else None


def find_comment(api: str, repo: str, pr: int, marker: str, token: str, max_pages: int = 30) -> dict | None:
    for page in range(1, max_pages + 1):
        batch = _request("GET", f"{api}/repos/{repo}/issues/{pr}/comments?per_page=100&page={page}", token)
        if not batch:
            return None
        for comment in batch:
            if marker in (comment.get("body") or ""):
                return comment
        if len(batch) < 100:
            return None
    return None


def upsert_comment(api: str, repo: str, pr: int, body: str, token: str, marker: str | None = None) -> tuple[str, dict]:
    """('updated' | 'created', the comment) — the one comment carrying the marker."""
    marker = marker or marker_of(body)
    if marker not in body:
        body = f"{marker}\n{body}"
    existing = find_comment(api, repo, pr, marker, token)
    if existing:
        return "updated", _request("PATCH", f"{api}/repos/{repo}/issues/comments/{existing['id']}", token, {"body": body})
    return "created", _request("POST", f"{api}/repos/{repo}/issues/{pr}/comments", token, {"body": body})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ci.github_comment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=os.environ.get("GITHUB_REPOSITORY"), help="OWNER/NAME (default: $GITHUB_REPOSITORY)")
    parser.add_argument("--pr", type=int, required=True, help="pull request number")
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--marker", default=None, help="hidden marker (default: the body's first line)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be done; no network call")
    args = parser.parse_args(argv)
    try:
        if not args.repo or "/" not in args.repo:
            raise GitHubError("--repo OWNER/NAME is required (or set GITHUB_REPOSITORY)")
        path = Path(args.body_file)
        if not path.is_file():
            raise GitHubError(f"{path} not found")
        body = path.read_text(encoding="utf-8")
        marker = args.marker or marker_of(body)
        if args.dry_run:
            print(f"[github_comment] dry run: would create or update the comment marked {marker} on "
                  f"{args.repo}#{args.pr} ({len(body):,} characters)")
            return 0
        token = os.environ.get("GITHUB_TOKEN") or os.environ.get("GH_TOKEN")
        if not token:
            raise GitHubError("GITHUB_TOKEN is not set")
        api = os.environ.get("GITHUB_API_URL", DEFAULT_API).rstrip("/")
        action, comment = upsert_comment(api, args.repo, args.pr, body, token, marker)
        print(f"[github_comment] {action} comment {comment.get('id')} on {args.repo}#{args.pr}: {comment.get('html_url', '')}")
        return 0
    except GitHubError as exc:
        print(f"[github_comment] {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
