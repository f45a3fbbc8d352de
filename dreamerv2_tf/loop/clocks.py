"""The loop's clocks: counters, the schedules that fire on them, and where wall-clock time goes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


class Counter:
    """A number that only grows: the agent steps of a run."""

    def __init__(self, value: int = 0):
        self.value = int(value)

    def increment(self, amount: int = 1) -> None:
        self.value += amount


class Every:
    """True when a growing counter passes the next multiple of `interval` after `last`.

    Without `last` the first call is True. Firing on multiples keeps log and
    checkpoint steps round and evenly spaced, also after resuming mid-interval.
    Never True when interval <= 0. With `agree` (e.g. `lambda due: cluster.agree(due, "chief")`)
    the answer is the one all workers agree on, so a decision that leads to updates or saves is
    the same on every worker.
    """

    def __init__(self, interval: int, last: int | None = None, agree: Callable[[bool], bool] | None = None):
        self.interval, self.last, self.agree = interval, last, agree

    def __call__(self, step: int) -> bool:
        due = self._due(step)
        return self.agree(due) if self.agree is not None else due

    def _due(self, step: int) -> bool:
        if self.interval <= 0:
            return False
        if self.last is None or step // self.interval > self.last // self.interval:
            self.last = step
            return True
        return False


class Stopwatch:
    """Wall-clock time spent in named sections: as fractions of the time since the last `fractions()`,
    and in total seconds since `start()` (or creation).

    Sections must not nest, so the fractions add up to at most 1 (the rest is the loop's own bookkeeping).
    """

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        """Forget everything so far: both the interval and the totals begin now."""
        self._spent: dict[str, float] = {}
        self._total: dict[str, float] = {}
        self._since = self._started = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - begin
            self._spent[name] = self._spent.get(name, 0.0) + spent
            self._total[name] = self._total.get(name, 0.0) + spent

    def fractions(self, prefix: str = "time_") -> dict[str, float]:
        """{prefix + name: fraction of the wall clock} since the last call (or start), then a new interval."""
        now = time.perf_counter()
        wall = max(now - self._since, 1e-9)
        result = {prefix + name: spent / wall for name, spent in self._spent.items()}
        self._spent, self._since = {}, now
        return result

    def totals(self) -> tuple[float, dict[str, float]]:
        """(wall seconds since start, {name: seconds spent in it since start})."""
        return time.perf_counter() - self._started, dict(self._total)


__all__ = ["Counter", "Every", "Stopwatch"]
