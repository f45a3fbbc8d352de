"""Envs that name themselves when they fail, so a run can tell a broken env from a broken agent.

An exception out of an env's reset or step (or a dead worker process) becomes EnvFailed, a one-line
message naming the env, raised from the env's own exception. The agent is untouched by it, so the run
can save before it stops; any other exception may come from the agent and is left as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent import futures
from typing import Any

import numpy as np

from dreamerv2_tf.envs.parallel import WorkerDied


class EnvFailed(RuntimeError):
    """An env's reset or step raised, or its worker process died. `__cause__` is the env's exception."""


class Guarded:
    """Passes every call through to `env`; failures of reset, step and their async results become EnvFailed."""

    def __init__(self, env: Any, name: str):
        self.env, self.name = env, name

    def __getattr__(self, attribute: str) -> Any:  # spaces, close, ...; the async calls only where env has them
        value = getattr(self.env, attribute)
        if attribute in ("reset_async", "step_async"):  # a worker proxy's: handing over the call can fail too
            return lambda *args: self._call(value, *args)
        return value

    def reset(self) -> dict[str, np.ndarray]:
        return self._call(self.env.reset)

    def step(self, action: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return self._call(self.env.step, action)

    def result(self, future: futures.Future) -> Any:
        return self._call(self.env.result, future)

    def _call(self, method: Any, *args: Any) -> Any:
        try:
            return method(*args)
        except Exception as exc:  # KeyboardInterrupt and the run's Aborted are no env failure
            raise EnvFailed(f"{self.name} {describe(exc)}") from exc


def describe(exc: BaseException) -> str:
    """What happened to the env, in a few words: its exception's type and first line."""
    if isinstance(exc, WorkerDied):  # its message says it all
        return f"failed: {exc}"
    lines = str(exc).strip().splitlines()
    return f"raised {type(exc).__name__}" + (f": {lines[0][:300]}" if lines else "")


def guard(envs: Sequence[Any], mode: str) -> list[Guarded]:
    """`envs` named '<mode> env <index>'."""
    return [Guarded(env, f"{mode} env {index}") for index, env in enumerate(envs)]


__all__ = ["EnvFailed", "Guarded", "guard", "describe"]
