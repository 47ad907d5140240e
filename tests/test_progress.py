"""stages/core/progress.py: plain lines at a fixed interval without a terminal (fake clock), a tqdm
bar on one, and the figures (rate, ETA, running values) both show."""

from __future__ import annotations

import io

import pytest

from stages.core import progress as P


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def _lines(stream):
    return [line for line in stream.getvalue().split("\n") if line]


def test_lines_mode_prints_at_the_interval_with_rate_eta_and_running_value(monkeypatch):
    monkeypatch.delenv(P.MODE_ENV, raising=False)
    clock, out = FakeClock(), io.StringIO()          # a StringIO is not a terminal: lines mode
    with P.progress("train", total=100, unit="step", interval=10, stream=out, clock=clock) as bar:
        assert bar.mode == "lines"
        for _ in range(40):                          # 40 steps, one every 0.5 s: 20 s in all
            clock.now += 0.5
            bar.update(1, loss=2.0 - bar.n / 100)
        assert len(_lines(out)) == 2                 # at 10 s and at 20 s, not once per step
        clock.now += 3
        bar.update(1)                                # 3 s after the last line: nothing new
        assert len(_lines(out)) == 2
    lines = _lines(out)
    assert len(lines) == 3                           # + the last line when the work ends
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()   # never a redraw
    first = lines[0]
    assert first.startswith("[train] 20/100 step (20%)")
    assert "2 step/s" in first                       # 20 steps in 10 s
    assert "ETA 40s" in first                        # 80 left at 2 step/s
    assert "elapsed 10s" in first and "loss 1.81" in first
    assert lines[1].startswith("[train] 40/100 step (40%)") and "ETA 30s" in lines[1]
    assert lines[2].startswith("[train] 41/100 step (41%)") and lines[2].endswith("loss 1.61")
    assert "done" in lines[2] and "ETA" not in lines[2] and "elapsed 23s" in lines[2]


def test_lines_interval_from_the_environment_and_set_without_advancing(monkeypatch):
    monkeypatch.delenv(P.MODE_ENV, raising=False)
    monkeypatch.setenv(P.INTERVAL_ENV, "2")
    clock, out = FakeClock(), io.StringIO()
    bar = P.progress("merge check", total=None, unit="token", stream=out, clock=clock)
    assert bar.interval == 2.0
    clock.now += 1
    bar.update(5)
    assert out.getvalue() == ""
    clock.now += 1
    bar.set(phase="merged")                          # a running value alone also reports on time
    line = _lines(out)[0]
    assert line == "[merge check] 5 token, 2.5 token/s, elapsed 2s, phase merged"  # no total: no %, no ETA
    monkeypatch.setenv(P.INTERVAL_ENV, "soon")       # unreadable: the default
    assert P.progress("x", stream=io.StringIO()).interval == P.DEFAULT_INTERVAL_S


def test_slow_work_shows_seconds_per_unit_and_unknown_eta():
    clock, out = FakeClock(), io.StringIO()
    bar = P.progress("convert", total=4, unit="step", mode="lines", interval=0, stream=out, clock=clock)
    assert bar.eta is None and bar.rate is None
    assert "ETA ?" in bar.line() and "? step/s" in bar.line()
    clock.now += 30
    bar.update(1)
    assert "30 s/step" in _lines(out)[0] and "ETA 1m30s" in _lines(out)[0]
    assert P.format_duration(3725) == "1h02m05s"


def test_tty_mode_is_a_tqdm_bar(monkeypatch):
    monkeypatch.delenv(P.MODE_ENV, raising=False)
    from tqdm import tqdm

    out = FakeTTY()
    with P.progress("evaluate: tuned answers", total=8, unit="answer", stream=out) as bar:
        assert bar.mode == "bar" and isinstance(bar._bar, tqdm)
        # a terminal that reports no size (here: none at all) gets one, else tqdm draws or shows nothing
        assert bar._bar.ncols == 100 and bar._bar.nrows == 24
        bar.update(4, tok_s=12.345)
        bar.write("a log line")
        assert bar._bar.n == 4 and bar._bar.total == 8
        assert bar._bar.postfix == "tok_s=12.35"
    text = out.getvalue()
    assert "\r" in text                              # tqdm redraws in place
    assert "evaluate: tuned answers" in text and "8/8" not in text and "4/8" in text
    assert "answer/s" in text and "tok_s=12.35" in text and "a log line" in text


def test_mode_can_be_forced_or_silenced(monkeypatch):
    monkeypatch.setenv(P.MODE_ENV, "off")
    out = FakeTTY()
    with P.progress("x", total=2, stream=out) as bar:
        bar.update(2, loss=1.0)
        bar.write("quiet")
    assert bar.mode == "off" and out.getvalue() == ""
    monkeypatch.setenv(P.MODE_ENV, "lines")
    assert P.progress("x", stream=FakeTTY()).mode == "lines"
    monkeypatch.delenv(P.MODE_ENV)
    with pytest.raises(ValueError, match="progress mode"):
        P.progress("x", mode="fancy")


def test_the_last_unit_is_reported_once_by_the_closing_line():
    clock, out = FakeClock(), io.StringIO()
    with P.progress("answers", total=4, unit="answer", mode="lines", interval=10, stream=out, clock=clock) as bar:
        clock.now += 48                              # one batch of 4 answers, longer than the interval
        bar.update(4, tokens_per_s=4.2)
    lines = _lines(out)
    assert lines == ["[answers] 4/4 answer (100%), 12 s/answer, elapsed 48s, done, tokens_per_s 4.2"]


def test_library_bars_are_quieted_without_a_terminal_only(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv(P.MODE_ENV, raising=False)
    try:
        hf_logging.enable_progress_bar()
        assert P.quiet_library_bars(FakeTTY()) is False and hf_logging.is_progress_bar_enabled()
        assert P.quiet_library_bars(io.StringIO()) is True and not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
