"""This machine's CPU kind, and whether a run rewrote outputs that were committed on another kind.

    python -m stages.cpu kind             # e.g. "AuthenticAMD avx512 avx512_bf16, 2 threads"
    python -m stages.cpu check-outputs    # `make pipeline` runs it after dvc repro: one line, or nothing

The kind is what a CPU run's bytes depend on (stages/core/determinism.py, docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import sys

from .core.determinism import cpu_kind, other_kind_note
from .core.params import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.cpu", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("kind", "check-outputs"))
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    if args.command == "kind":
        threads = load_params(args.params).cpu.threads
        print(cpu_kind(threads or None))
        return 0
    note = other_kind_note()
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
