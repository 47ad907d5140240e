"""How stage entry points fail: one clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import errno
import sys
from typing import Callable

from .params import ConfigError
from .records import DataError

EXIT_DATA = 1
EXIT_CONFIG = 2
EXIT_IO = 4

# What to do about the file-system failures a stage meets in practice.
IO_ADVICE = {
    errno.ENOSPC: "free disk space (or point the output elsewhere) and re-run",
    errno.EDQUOT: "free space within your disk quota and re-run",
    errno.EROFS: "the file system is read-only: write the outputs to a writable folder",
    errno.EACCES: "no permission: check the folder's owner and mode",
    errno.EPERM: "not permitted: check the folder's owner and mode",
}


def run(main: Callable[[], int | None], stage: str) -> int:
    try:
        return main() or 0
    except ConfigError as exc:
        print(f"[{stage}] configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except DataError as exc:
        print(f"[{stage}] data error: {exc}", file=sys.stderr)
        return EXIT_DATA
    except OSError as exc:
        print(f"[{stage}] {io_error_line(exc)}", file=sys.stderr)
        return EXIT_IO


def io_error_line(exc: OSError) -> str:
    """One line for a file-system failure: what, where and what to do (outputs are written to a
    temporary file or folder first, so none is left half-written)."""
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = f" at {exc.filename}" if exc.filename else ""
    advice = IO_ADVICE.get(exc.errno)
    return f"{what}{f' ({code})' if code else ''}{where}" + (f"; {advice}" if advice else "")


BASE_MODEL_HELP = ("the base stage's model folder (models/base in dvc.yaml): model.base is read from it, after "
                   "checking it was built for params.yaml's model.base/revision; '' = resolve model.base here")


def use_base_model(folder: str | None, model_params) -> None:
    """--base-model: read model.base (and its own tokenizer) from the base stage's folder."""
    if folder:
        from .modeling import use_base_folder

        use_base_folder(folder, model_params)
