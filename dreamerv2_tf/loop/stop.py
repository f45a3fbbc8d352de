"""Stopping a run on request: the first SIGINT/SIGTERM asks for a save and a clean exit, a second aborts."""

from __future__ import annotations

import signal


def run_signal_handlers() -> None:
    """Run the Python handlers of signals that have arrived, now, in this (the main) thread.

    CPython 3.11 on Linux can leave a signal unhandled for seconds or for good while the main thread
    calls into native code (TensorFlow) and other Python threads (executor and tf.data threads) take
    the GIL in between: one of them clears the interpreter's "handle pending signals" flag, which only
    the main thread may act on. pthread_sigmask with an empty set changes nothing, but afterwards checks
    for pending signals and runs their handlers, so loops call this once per step.
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, ())


class Aborted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: the run ends at once, without saving (exit status 128 + signal number).

    A KeyboardInterrupt, so no `except Exception` on the way out swallows it.
    """

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_status = 128 + signum
        super().__init__(f"received {signal.Signals(signum).name} again: aborted without saving")


class Stop:
    """Turns SIGINT/SIGTERM into a flag: the loop finishes its step, then `then` (saves) and exits.

    A second signal raises Aborted: the user (or the scheduler) does not want to wait for the save.
    The handlers are installed even where the signals were inherited as ignored (a job started with
    `&` from a script), so that `kill -INT` always reaches the loop.
    """

    def __init__(self, then: str = "saving"):
        self._requested = False
        self._previous = {}
        self._then = then
        self.signum: int | None = None  # the first signal received

    @property
    def requested(self) -> bool:
        run_signal_handlers()  # a signal that arrived meanwhile counts at once
        return self._requested

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self._requested:  # a second signal aborts at once
            raise Aborted(signum)
        print(f"\nreceived {signal.Signals(signum).name}: finishing the current step, {self._then}, exiting",
              flush=True)
        self.signum = signum
        self._requested = True


__all__ = ["Aborted", "Stop", "run_signal_handlers"]
