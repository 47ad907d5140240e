"""Progress of long work: a redrawn bar on a terminal, a plain line every few seconds elsewhere.

    from stages.core.progress import progress

    with progress("train", total=steps, unit="step") as bar:
        for batch in batches:
            loss = step(batch)
            bar.update(1, loss=loss)        # advance; keyword values are shown as running values
        bar.set(val_loss=val)               # change a shown value without advancing
        bar.write("[train] epoch 1 done")   # a log line that does not break the bar

What it shows: done/total, percent, rate (units per second, averaged since the start), elapsed time,
ETA (remaining / rate) and the running values (floats with 4 significant digits).

Two modes, chosen by where the output goes (`mode="auto"`):
- "bar": the stream is a terminal: a tqdm bar redrawn in place (tqdm's own rate and ETA);
- "lines": anything else (CI logs, a file, `dvc repro` piped): one plain line at most every
  `interval` seconds, and a last line when the work ends, never a carriage return. The interval
  defaults to 10 s; the environment variable LLAMA_FT_PROGRESS_INTERVAL (seconds) changes it, and
  LLAMA_FT_PROGRESS=off|bar|lines forces a mode (off prints nothing).
The output goes to stderr (like tqdm), so a stage's stdout stays its own report.
`quiet_library_bars()` at a stage's start turns off transformers' own redrawn bars in lines mode.

`total=None` (an unknown amount of work) shows done and rate, without percent or ETA. Nothing here
imports torch: the module is cheap to import anywhere.
"""

from __future__ import annotations

import io
import math
import os
import sys
import time
from typing import Callable, TextIO

DEFAULT_INTERVAL_S = 10.0
INTERVAL_ENV = "LLAMA_FT_PROGRESS_INTERVAL"
MODE_ENV = "LLAMA_FT_PROGRESS"
MODES = ("auto", "bar", "lines", "off")


def default_interval() -> float:
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value >= 0 and math.isfinite(value) else DEFAULT_INTERVAL_S


def resolve_mode(mode: str, stream: TextIO) -> str:
    forced = os.environ.get(MODE_ENV, "").strip().lower()
    if mode == "auto" and forced in MODES:
        mode = forced
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "auto":
        isatty = getattr(stream, "isatty", None)
        try:
            return "bar" if isatty is not None and isatty() else "lines"
        except (ValueError, OSError):  # a closed stream
            return "lines"
    return mode


def _terminal_size(stream) -> tuple[int, int]:
    """(columns, lines) of the stream's terminal; 0 where unknown."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return 0, 0
    return size.columns, size.lines


def format_duration(seconds: float | None) -> str:
    """1h02m03s, 4m05s or 6s; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_value(value) -> str:
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _number(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else f"{n:.4g}"


def format_rate(rate: float | None, unit: str) -> str:
    if not rate:
        return f"? {unit}/s"
    if rate < 1:  # slow work reads better as seconds per unit
        return f"{1 / rate:.3g} s/{unit}"
    return f"{rate:.3g} {unit}/s"


class Progress:
    """One piece of long work. Use it through `progress(...)` (a context manager)."""

    def __init__(self, desc: str, total: float | None = None, unit: str = "it", *, mode: str = "auto",
                 interval: float | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.mode = resolve_mode(mode, self.stream)
        self.interval = default_interval() if interval is None else float(interval)
        self.clock = clock
        self.n = 0.0
        self.values: dict[str, object] = {}
        self.started = clock()
        self._last_line = self.started
        self._closed = False
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            # A terminal without a size (a pty that reports 0 x 0, e.g. under `script` or some CI
            # runners) makes tqdm draw nothing (0 columns) or hide the bar (0 rows): give it a size then.
            columns, lines = _terminal_size(self.stream)
            size = {"dynamic_ncols": True} if columns > 0 else {"ncols": 100}
            if lines <= 0:
                size["nrows"] = 24
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=True, **size)

    # -- what the caller uses ---------------------------------------------------------------------

    def update(self, n: float = 1, **values) -> None:
        """Advance by n units; keyword values (e.g. loss=1.23) become the shown running values
        (None removes one)."""
        self.n += n
        self._values(values)
        if self._bar is not None:
            if values:
                self._bar.set_postfix({k: format_value(v) for k, v in self.values.items()}, refresh=False)
            self._bar.update(n)
        elif self.mode == "lines":
            self._maybe_line()

    def set(self, **values) -> None:
        """Change the shown running values without advancing (None removes one)."""
        self._values(values)
        if self._bar is not None:
            self._bar.set_postfix({k: format_value(v) for k, v in self.values.items()})
        elif self.mode == "lines":
            self._maybe_line()

    def _values(self, values: dict) -> None:
        for key, value in values.items():
            if value is None:
                self.values.pop(key, None)
            else:
                self.values[key] = value

    def write(self, message: str) -> None:
        """A log line that does not break the bar (tqdm.write on a terminal, a plain line otherwise)."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        elif self.mode != "off":
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """Ends the work: the bar stays on screen; in lines mode a last line with the totals."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines":
            self._emit(final=True)

    # -- figures ----------------------------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        return max(0.0, self.clock() - self.started)

    @property
    def rate(self) -> float | None:
        """Units per second since the start (None before any time has passed)."""
        elapsed = self.elapsed
        return self.n / elapsed if elapsed > 0 and self.n > 0 else None

    @property
    def eta(self) -> float | None:
        """Seconds left at the average rate so far (None without a total or a rate)."""
        rate = self.rate
        if self.total is None or not rate:
            return None
        return max(0.0, (self.total - self.n) / rate)

    def line(self, final: bool = False) -> str:
        """The plain line: '[desc] 12/40 step (30%), 1.5 step/s, elapsed 8s, ETA 19s, loss 1.234'."""
        done = _number(self.n)
        if self.total is not None:
            percent = 100.0 * self.n / self.total if self.total else 100.0
            head = f"[{self.desc}] {done}/{_number(self.total)} {self.unit} ({percent:.0f}%)"
        else:
            head = f"[{self.desc}] {done} {self.unit}"
        parts = [head, format_rate(self.rate, self.unit), f"elapsed {format_duration(self.elapsed)}"]
        if final:
            parts.append("done")
        elif self.total is not None:
            parts.append(f"ETA {format_duration(self.eta)}")
        parts += [f"{k} {format_value(v)}" for k, v in self.values.items()]
        return ", ".join(parts)

    def _maybe_line(self) -> None:
        finished = self.total is not None and self.n >= self.total  # the closing line says it
        if not finished and self.clock() - self._last_line >= self.interval:
            self._emit()

    def _emit(self, final: bool = False) -> None:
        self._last_line = self.clock()
        print(self.line(final), file=self.stream, flush=True)

    # -- context manager --------------------------------------------------------------------------

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def quiet_library_bars(stream: TextIO | None = None) -> bool:
    """Without a terminal, turn off the redrawn bars of transformers ("Loading weights", "Writing
    model shards") and huggingface_hub, which would fill CI logs with carriage returns; a stage calls
    this once at its start. Returns True when it turned them off."""
    if resolve_mode("auto", stream if stream is not None else sys.stderr) == "bar":
        return False
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    return True


def progress(desc: str, total: float | None = None, unit: str = "it", **options) -> Progress:
    """`with progress("evaluate: tuned answers", total=63, unit="answer") as bar: bar.update(16)`.

    options: mode ("auto", "bar", "lines", "off"), interval (seconds between plain lines; default
    LLAMA_FT_PROGRESS_INTERVAL or 10), stream (default stderr), clock (for tests)."""
    return Progress(desc, total, unit, **options)
