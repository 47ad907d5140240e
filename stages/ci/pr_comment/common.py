"""Shared by every section: git and DVC calls (never a remote), number and cell formatting, JSON reading."""

from __future__ import annotations

import html
import json
import math
import subprocess
import sys
from pathlib import Path

MARKER = "<!-- llama-finetune:pr-report -->"
# GitHub rejects comments over 65,536 characters.
MAX_COMMENT_CHARS = 60_000


def _run(cmd: list[str], cwd: str | Path) -> tuple[bool, str]:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return proc.returncode == 0, (proc.stdout if proc.returncode == 0 else (proc.stderr or proc.stdout)).strip()


def resolve_base(base: str, cwd: str | Path = ".") -> str | None:
    """`main` locally, else `origin/main` (what a pull-request checkout with fetch-depth 0 has)."""
    for candidate in (base, f"origin/{base}"):
        ok, _ = _run(["git", "rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}"], cwd)
        if ok:
            return candidate
    return None


def changed_files(base: str, cwd: str | Path = ".") -> list[str] | None:
    """Files this branch changes relative to its merge base with `base` (None if git cannot tell)."""
    ok, out = _run(["git", "diff", "--name-only", f"{base}...HEAD"], cwd)
    if not ok:
        return None
    ok2, dirty = _run(["git", "diff", "--name-only", "HEAD"], cwd)
    names = set(out.splitlines()) | (set(dirty.splitlines()) if ok2 else set())
    return sorted(n for n in names if n)


def _table_rows(md: str | None) -> int:
    """Data rows of a markdown table printed by dvc (header and separator excluded)."""
    return max(0, sum(1 for line in (md or "").splitlines() if line.startswith("|")) - 2)


def dvc(args: list[str], cwd: str | Path = ".") -> tuple[bool, str]:
    return _run([sys.executable, "-m", "dvc", *args], cwd)


def git_show(rev: str, path: str, cwd: str | Path = ".") -> str | None:
    ok, out = _run(["git", "show", f"{rev}:{path}"], cwd)
    return out if ok else None


def read_at_rev(rev: str, path: str, cwd: str | Path = ".") -> str | None:
    """A file as it was at `rev`: from git if tracked there, else from the local DVC cache via
    that revision's dvc.lock. Never from a remote: a comment must not wait on network credentials."""
    text = git_show(rev, path, cwd)
    return text if text is not None else read_from_dvc_cache(rev, path, cwd)


def read_from_dvc_cache(rev: str, path: str, cwd: str | Path = ".") -> str | None:
    import yaml

    lock_text = git_show(rev, "dvc.lock", cwd)
    if not lock_text:
        return None
    try:
        lock = yaml.safe_load(lock_text) or {}
    except yaml.YAMLError:
        return None
    ok, cache_dir = dvc(["cache", "dir"], cwd)
    if not ok or not cache_dir:
        return None
    files = Path(cache_dir.splitlines()[-1].strip())
    files = files if files.is_absolute() else Path(cwd) / files
    files = files / "files" / "md5"

    def blob(md5: str) -> Path:
        return files / md5[:2] / md5[2:]

    for stage in (lock.get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            out_path, md5 = str(out.get("path", "")), str(out.get("md5", ""))
            if not md5:
                continue
            try:
                if out_path == path:
                    return blob(md5).read_text(encoding="utf-8")
                if md5.endswith(".dir") and path.startswith(out_path.rstrip("/") + "/"):
                    rel = path[len(out_path.rstrip("/")) + 1:]
                    for entry in json.loads(blob(md5).read_text(encoding="utf-8")):
                        if entry.get("relpath") == rel and entry.get("md5"):
                            return blob(entry["md5"]).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
                return None
    return None


def _num(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _fmt(value, name: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        if name.split(".")[-1] == "passed" or name.endswith("_passed"):
            return "pass" if value else "fail"
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return _cell(str(value))


def _cell(text: str) -> str:
    return html.escape(text.replace("\n", " ").replace("|", "\\|"), quote=False)


def _load_json(path: Path) -> tuple[dict | None, str | None]:
    if not path.is_file():
        return None, f"{path} not found"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path} is not valid JSON ({exc})"
    return (data, None) if isinstance(data, dict) else (None, f"{path} is not a JSON object")


def _json_text(text: str | None) -> dict | None:
    try:
        data = json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _num_str(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
