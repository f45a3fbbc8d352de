"""What a run prints: progress bars (or plain progress lines in a log file) and number formats."""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Any

import numpy as np


class Progress:
    """Progress for a long phase (prefill, training towards `steps`) with rate and ETA.

    On a terminal this is a tqdm bar. Otherwise (logs redirected to a file, CI)
    it prints a plain line each time another `every` fraction of the total is
    done, so log files stay readable: at most 1 / every lines and a final one.
    Counts past the total (a prefill that ends in a long episode) show as 100%.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        initial: int = 0,
        unit: str = "steps",
        every: float = 0.1,
        file: IO[str] | None = None,
        enabled: bool = True,
    ):
        if not is_int(total) or total < 0:
            raise ValueError(f"Progress total must be an integer >= 0, got {total!r}")
        if not is_int(initial) or initial < 0:
            raise ValueError(f"Progress initial must be an integer >= 0, got {initial!r}")
        if not isinstance(every, int | float) or not 0 < every <= 1:
            raise ValueError(f"Progress every must be a fraction in (0, 1], got {every!r}")
        self.total = int(total)
        self.desc = desc
        self.unit = unit
        self.n = int(initial)
        self._initial = int(initial)
        self._every = every
        self._file = file if file is not None else sys.stdout
        self._enabled = enabled
        self._start = time.time()
        self._closed = False
        self._last_printed: int | None = None
        self._bar = None
        if enabled and _isatty(self._file):
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                desc=desc,
                initial=self.n,
                unit=f" {unit}",
                # SI prefixes (1.23M/50.0M) only where exact counts get hard to read.
                unit_scale=self.total >= 10_000,
                dynamic_ncols=True,
                file=self._file,
                smoothing=0.1,
            )
        # Plain mode prints when the done fraction crosses the next multiple of `every`.
        self._next_mark = self._mark_after(self.n)

    def update(self, n: int = 1) -> None:
        """Advances by n units."""
        if n < 0:
            raise ValueError(f"Progress.update expects n >= 0, got {n!r}")
        self.n += int(n)
        if self._bar is not None:
            if self.n > self._bar.total:
                self._bar.total = self.n  # a bar past its total would drop the percentage
            self._bar.update(int(n))
        elif self._enabled and self.total and self.n >= self._next_mark:
            self._print_plain()
            # Past the total (a prefill that overshoots by a long episode) only close() prints again.
            self._next_mark = self._mark_after(self.n) if self.n < self.total else math.inf

    def update_to(self, value: int) -> None:
        """Advances to an absolute count, e.g. the agent step; never moves backwards."""
        if value > self.n:
            self.update(int(value) - self.n)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._enabled and self.n > self._initial and self._last_printed != self.n:
            self._print_plain()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _mark_after(self, n: int) -> float:
        if not self.total:
            return math.inf
        step = self._every * self.total
        return (math.floor(n / step + 1e-9) + 1) * step

    def _print_plain(self) -> None:
        elapsed = time.time() - self._start
        done = self.n - self._initial
        rate = done / elapsed if elapsed > 0 else 0.0
        percent = min(100.0, 100.0 * self.n / self.total) if self.total else 100.0
        line = f"{self.desc}: {percent:3.0f}% {self.n:,}/{self.total:,} {self.unit}"
        line += f", {format_number(rate)} {self.unit}/s"
        if rate > 0 and self.n < self.total:
            line += f", ETA {_format_duration((self.total - self.n) / rate)}"
        print_line(line, self._file)
        self._last_printed = self.n


def format_number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{seconds:02d}"
    return f"{days}d {clock}" if days else clock


def _isatty(file: IO[str]) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):
        return False


def print_line(line: str, file: IO[str] | None = None) -> None:
    # tqdm.write clears and redraws any active bar around the line instead of breaking it.
    from tqdm import tqdm

    tqdm.write(line, file=file if file is not None else sys.stdout)
    (file if file is not None else sys.stdout).flush()


def is_int(value: Any) -> bool:
    """An int (numpy ints too), not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


__all__ = ["Progress", "format_number", "print_line", "is_int"]
