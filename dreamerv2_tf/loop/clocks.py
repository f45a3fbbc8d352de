"""The loop's clocks: counters and the schedules that fire on them."""

from __future__ import annotations

from collections.abc import Callable


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


__all__ = ["Counter", "Every"]
