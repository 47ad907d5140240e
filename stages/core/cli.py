"""How stage entry points fail: one clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys
from typing import Callable

from .params import ConfigError
from .records import DataError

EXIT_DATA = 1
EXIT_CONFIG = 2


def run(main: Callable[[], int | None], stage: str) -> int:
    try:
        return main() or 0
    except ConfigError as exc:
        print(f"[{stage}] configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except DataError as exc:
        print(f"[{stage}] data error: {exc}", file=sys.stderr)
        return EXIT_DATA
