"""Crafter (Hafner 2021): 64x64 RGB image, 17 discrete actions, achievements as log keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from gymnasium import spaces

from dreamerv2_tf.envs import base

TASKS = ("reward", "noreward")


def check_task(task: str) -> None:
    """A one-line ValueError for a Crafter task other than reward and noreward."""
    if task not in TASKS:
        raise ValueError(f"unknown Crafter task '{task}'; choices: crafter_reward, crafter_noreward")


class Crafter:
    """`reward=False` hides the reward from the agent; 'log_reward' always carries the true one."""

    def __init__(self, task: str = "reward", *, seed: int = 0, size: tuple[int, int] = (64, 64)):
        import crafter

        check_task(task)
        self._env = crafter.Env(size=(int(size[1]), int(size[0])), reward=task == "reward", seed=int(seed))
        self._size = (int(size[0]), int(size[1]))
        self._achievements = tuple(crafter.constants.achievements)
        counts = {f"log_achievement_{name}": spaces.Box(0, np.iinfo(np.int32).max, (), np.int32)
                  for name in self._achievements}
        self.obs_space = {
            "image": base.image_space(self._size, 3),
            **base.flag_spaces(),
            "log_reward": spaces.Box(-np.inf, np.inf, (), np.float32),
            **counts,
        }
        self.act_space = base.discrete_act_space(self._env.action_space.n)

    def reset(self) -> dict[str, np.ndarray]:
        image = self._env.reset()
        return self._obs(image, 0.0, 0.0, {}, first=True)

    def step(self, action: Mapping[str, Any]) -> dict[str, np.ndarray]:
        index = base.discrete_index(action, self.act_space["action"].n)
        image, reward, done, info = self._env.step(index)
        # Crafter ends at its 10k-step length with discount 1; discount 0 means the player died.
        terminal = info["discount"] == 0
        return self._obs(image, reward, info["reward"], info["achievements"], last=done, terminal=terminal)

    def close(self) -> None:
        pass  # Crafter holds no external resources.

    def _obs(self, image: np.ndarray, reward: float, true_reward: float, achievements: Mapping[str, int],
             first: bool = False, last: bool = False, terminal: bool = False) -> dict[str, np.ndarray]:
        obs = {"image": base.resize_image(np.asarray(image, np.uint8), self._size)}
        obs.update(base.flags(reward, first=first, last=last, terminal=terminal))
        obs["log_reward"] = np.float32(true_reward)
        for name in self._achievements:
            obs[f"log_achievement_{name}"] = np.int32(achievements.get(name, 0))
        return obs
