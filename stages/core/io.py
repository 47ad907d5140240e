"""File I/O shared by the stages: atomic writes, so a failed stage never leaves half an output."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _replaced(path: Path):
    """Yields a temporary file's path beside `path`; on success it replaces `path` in one rename, on
    any failure it is removed and `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with _replaced(Path(path)) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def copy_file_atomic(source: str | Path, destination: str | Path) -> None:
    """Copy a file so that `destination` is either the old file or the whole new one, never half."""
    with _replaced(Path(destination)) as tmp:
        shutil.copyfile(source, tmp)


def link_or_copy(source: str | Path, destination: str | Path) -> bool:
    """Hard-link `source` to the new file `destination`, or copy it where a link is impossible (another
    filesystem, a filesystem without links). Returns True when it linked.

    Only for files nobody writes in place: the two names share one inode, so a write through either
    changes both. A model converted into this project's cache and then read by the base stage is such
    a file; a 540 MB copy per clone is not worth having."""
    try:
        os.link(source, destination)
        return True
    except OSError:
        shutil.copyfile(source, destination)
        return False


def write_json(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def read_json(path: str | Path, missing: str | None = None):
    """A JSON file's content. A missing file gives None or, when `missing` is given, a ConfigError
    "<path> not found<missing>"; a file that is not JSON (or not UTF-8) is a ConfigError."""
    from .params import ConfigError

    path = Path(path)
    if not path.is_file():
        if missing is None:
            return None
        raise ConfigError(f"{path} not found{missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None


def jsonl_text(rows) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    old = None
    try:
        yield tmp
        if path.exists():
            # Set the old folder aside first (a rename), so a failure never leaves half of it.
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / path.name, path)
                raise
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None and path.exists():  # never delete the old outputs if they are not back
            shutil.rmtree(old, ignore_errors=True)
