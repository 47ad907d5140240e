"""Publish a stage's figures from its cached output to the git-tracked files reviewers and CI read.

    python -m stages.publish reports/train/train.json=metrics/train.json reports/train/live=dvclive/train

Why a separate stage: DVC 3 keeps no run cache for a stage that has a `cache: false` entry under
`outs:` (dvc/stage/__init__.py, `no_cache_outs`; `metrics:` and `plots:` entries are exempt). train and
evaluate therefore write their figures into cached outputs (reports/train, reports/eval), so that a
rerun with the same inputs, in the proxy verdict's worktrees or on another runner that pulled the
remote's run cache, restores them instead of training again; this stage then copies them to
metrics/ and dvclive/, which git tracks (the PR comment, the gate and `git show REV:metrics/...` read
them there). It is a copy, so it costs nothing to rerun.

Each SOURCE=DESTINATION pair is a file or a folder. A destination is replaced whole and atomically: it is
either the old copy or the new one, never half of each. A missing source is an error that names it, and
nothing is published then (every source is checked before the first copy).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from stages.core import io


def parse_pair(text: str) -> tuple[Path, Path]:
    source, sep, destination = text.partition("=")
    if not sep or not source or not destination:
        raise ValueError(f"{text!r}: expected SOURCE=DESTINATION, e.g. reports/train/train.json=metrics/train.json")
    return Path(source), Path(destination)


def publish(pairs: list[tuple[Path, Path]]) -> list[str]:
    """Copy each source to its destination; returns one line per copy. Checks every source first."""
    missing = [str(source) for source, _ in pairs if not source.exists()]
    if missing:
        raise FileNotFoundError(f"nothing published: no such file or folder: {', '.join(missing)} "
                                "(the stage that writes it has not run: dvc repro runs it first)")
    done = []
    for source, destination in pairs:
        if source.is_dir():
            if destination.exists() and not destination.is_dir():
                destination.unlink()
            with io.atomic_dir(destination) as tmp:
                # copyfile, not copy2: the cached source is read-only (DVC's hardlinks), the copy must not be
                shutil.copytree(source, tmp, dirs_exist_ok=True, copy_function=shutil.copyfile)
            count = sum(1 for p in destination.rglob("*") if p.is_file())
            done.append(f"{source}/ -> {destination}/ ({count} files)")
        else:
            if destination.is_dir():
                shutil.rmtree(destination)
            io.copy_file_atomic(source, destination)
            done.append(f"{source} -> {destination}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", metavar="SOURCE=DESTINATION")
    args = parser.parse_args(argv)
    try:
        pairs = [parse_pair(text) for text in args.pairs]
        for line in publish(pairs):
            print(f"[publish] {line}")
    except (ValueError, OSError) as exc:
        print(f"publish: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
