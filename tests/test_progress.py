"""Progress off a terminal: a plain line every interval, with rate and ETA."""

from __future__ import annotations

import io

from synthdistill.progress import LineProgress, format_duration, progress_bar


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_once_per_interval_with_rate_eta_and_postfix():
    clock, out = FakeClock(), io.StringIO()
    bar = LineProgress(100, "distill epoch 1/4", "step", interval=30, stream=out, clock=clock)
    for _ in range(10):
        clock.now += 2.0  # 10 steps in 20 s: no line yet
        bar.update()
    assert out.getvalue() == ""
    bar.set_postfix(loss=0.41234)
    for _ in range(5):
        clock.now += 2.0
        bar.update()
    lines = out.getvalue().splitlines()
    assert lines == ["distill epoch 1/4: 15/100 steps (15%), 0.5 steps/s, ETA 2m50s, loss 0.4123"]
    bar.close()
    assert len(out.getvalue().splitlines()) == 2  # a last line at the end


def test_resumed_progress_counts_the_rate_from_where_it_resumed():
    clock, out = FakeClock(), io.StringIO()
    bar = LineProgress(100, "distill", "step", initial=50, interval=10, stream=out, clock=clock)
    clock.now = 10.0
    bar.update(10)
    assert "60/100 steps (60%), 1 steps/s, ETA 40s" in out.getvalue()


def test_a_pipe_gets_line_progress_and_disabled_ranks_get_nothing():
    out = io.StringIO()
    assert isinstance(progress_bar(10, "generate", "image", stream=out), LineProgress)
    silent = progress_bar(10, "generate", "image", enabled=False, stream=out)
    silent.update(10)
    silent.close()
    assert out.getvalue() == ""


def test_durations_read_naturally():
    assert [format_duration(s) for s in (7.4, 262, 3725)] == ["7s", "4m22s", "1h02m05s"]
