"""Progress that reaches the user wherever the output goes.

In a terminal a stage shows a tqdm bar. Piped into a log (CI, SLURM, ``| tee``) tqdm shows
nothing useful, so there a stage prints one plain line every ``interval`` seconds instead:
``distill epoch 3/96: 120/960 steps (12%), 3.2 steps/s, ETA 4m22s, loss 0.412``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

T = TypeVar("T")

LINE_INTERVAL_S = 30.0


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s'; 262 -> '4m22s'; 7.4 -> '7s'."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class LineProgress:
    """tqdm's small interface (update, set_postfix, set_description, close) as periodic log lines.

    ``clock`` is injectable so the line schedule can be tested without waiting.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str,
        initial: int = 0,
        interval: float = LINE_INTERVAL_S,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval, self.stream, self.clock = interval, stream, clock
        self.start_n = initial
        self.start = self.last_line = clock()
        self.postfix: dict[str, Any] = {}
        self.lines = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last_line >= self.interval:
            self.print_line()

    def set_postfix(self, values: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(values or {}), **kwargs}

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = {"at": text} if text else {}

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        units = self.unit + ("es" if self.unit.endswith(("s", "sh", "ch", "x")) else "s")  # batches
        parts = [f"{self.n}/{self.total} {units}" if self.total else f"{self.n} {units}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {units}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        parts += [
            f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
            for key, value in self.postfix.items()
        ]
        return f"{self.desc}: " + ", ".join(parts)

    def print_line(self) -> None:
        print(self.line(), file=self.stream or sys.stderr, flush=True)
        self.last_line = self.clock()
        self.lines += 1

    def close(self) -> None:
        if self.n != self.start_n:
            self.print_line()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_iter(
    iterable: Iterable[T], total: int | None, desc: str, unit: str = "it", enabled: bool = True
) -> Iterator[T]:
    """``iterable`` with a :func:`progress_bar` that advances by one per item."""
    with progress_bar(total, desc, unit, enabled=enabled) as bar:
        for item in iterable:
            yield item
            bar.update()


def progress_bar(
    total: int | None,
    desc: str,
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
    stream: IO[str] | None = None,
) -> Any:
    """A tqdm bar on a terminal, periodic lines elsewhere, nothing when ``enabled`` is false
    (the non-zero ranks of a torchrun job)."""
    from tqdm import tqdm

    out = stream or sys.stderr
    if not enabled:
        return tqdm(total=total, disable=True)
    if out.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=out, dynamic_ncols=True)
    return LineProgress(total, desc, unit, initial=initial, stream=out)
