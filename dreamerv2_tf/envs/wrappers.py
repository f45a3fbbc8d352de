"""Generic wrappers over the env protocol: time limit and action repeat."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class Wrapper:
    """Forwards the protocol to an inner env; subclasses override what they change."""

    def __init__(self, env: Any):
        self.env = env

    @property
    def obs_space(self) -> dict:
        return self.env.obs_space

    @property
    def act_space(self) -> dict:
        return self.env.act_space

    def reset(self) -> dict[str, np.ndarray]:
        return self.env.reset()

    def step(self, action: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return self.env.step(action)

    def close(self) -> None:
        self.env.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "env":
            raise AttributeError(name)
        return getattr(self.env, name)


class TimeLimit(Wrapper):
    """Ends episodes after `limit` agent steps as a truncation: is_last without is_terminal."""

    def __init__(self, env: Any, limit: int):
        super().__init__(env)
        if limit <= 0:
            raise ValueError(f"time limit must be positive, got {limit}")
        self.limit = int(limit)
        self._count = 0

    def reset(self) -> dict[str, np.ndarray]:
        self._count = 0
        return self.env.reset()

    def step(self, action: Mapping[str, Any]) -> dict[str, np.ndarray]:
        obs = self.env.step(action)
        self._count += 1
        if self._count >= self.limit and not obs["is_last"]:
            obs = dict(obs, is_last=np.bool_(True))
        return obs


class ActionRepeat(Wrapper):
    """Repeats each action `repeat` times, summing rewards and stopping at the episode end."""

    def __init__(self, env: Any, repeat: int):
        super().__init__(env)
        if repeat < 1:
            raise ValueError(f"action_repeat must be at least 1, got {repeat}")
        self.repeat = int(repeat)

    def step(self, action: Mapping[str, Any]) -> dict[str, np.ndarray]:
        total = 0.0
        for _ in range(self.repeat):
            obs = self.env.step(action)
            total += float(obs["reward"])
            if obs["is_last"]:
                break
        return dict(obs, reward=np.float32(total))
