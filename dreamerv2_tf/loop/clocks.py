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


class Clock(Every):
    """The release's schedule clock: True on its first call, then once per `interval` counted from there.

    With `catch_up` the next firing point moves on by `interval` each time (a clock checked after every
    transition then fires exactly once per `interval` agent steps, however many envs step together);
    without it, the next point is `interval` after the step it last fired at (evaluation blocks, checked
    after whole vector steps). Never True when interval <= 0. `agree` as for `Every`.
    """

    def __init__(self, interval: int, catch_up: bool, last: int | None = None,
                 agree: Callable[[bool], bool] | None = None):
        super().__init__(interval, last, agree)
        self.catch_up = catch_up

    def _due(self, step: int) -> bool:
        if self.interval <= 0:
            return False
        if self.last is None:
            self.last = step
            return True
        if step >= self.last + self.interval:
            self.last = self.last + self.interval if self.catch_up else step
            return True
        return False


class Stopwatch:
    """Wall-clock time spent in named sections: as fractions of the time since the last `fractions()`,
    and in total seconds since `start()` (or creation).

    A section nested in another (an update run from a driver callback) counts for itself only, and
    not for the section around it, so the fractions add up to at most 1 (the rest is the loop's own
    bookkeeping).
    """

    def __init__(self) -> None:
        self._nested: list[float] = []  # per open section, the time spent in the sections inside it
        self.start()

    def start(self) -> None:
        """Forget everything so far: both the interval and the totals begin now."""
        self._spent: dict[str, float] = {}
        self._total: dict[str, float] = {}
        self._since = self._started = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - begin
            spent = elapsed - self._nested.pop()
            if self._nested:
                self._nested[-1] += elapsed
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


__all__ = ["Counter", "Every", "Clock", "Stopwatch"]
