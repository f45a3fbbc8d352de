"""MinAtar (Young & Tian 2019): five Atari-like games on a 10x10 grid, one boolean channel per object kind.

The observation 'image' holds the channels as uint8 (0 or 255), so the model sees a C-channel image like any
other: at the native 10x10 with the `minatar` config's two-layer CNN, or enlarged to `size` by repeating
cells (nearest neighbour) for the Atari CNN. Sticky actions are MinAtar's own (the previous action is
repeated with probability `sticky`, 0.1 in MinAtar). An episode ends when the game does; the only game
that ends on a timer, Freeway (2,500 steps, not visible in the frame), ends as a truncation.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

from dreamerv2_tf.envs import base

GAMES = ("asterix", "breakout", "freeway", "seaquest", "space_invaders")
TIMED_GAMES = ("freeway",)  # episodes end after a fixed number of steps, not by a terminal state
STICKY_PROB = 0.1  # MinAtar's default sticky-action probability
NATIVE_SIZE = (10, 10)


def check_game(name: str) -> None:
    """A one-line ValueError for a game MinAtar lacks."""
    if name not in GAMES:
        close = difflib.get_close_matches(name, GAMES, n=1, cutoff=0.5)
        hint = f" (did you mean minatar_{close[0]}?)" if close else ""
        raise ValueError(f"unknown MinAtar game '{name}'{hint}; choices: "
                         + ", ".join("minatar_" + game for game in GAMES))


class MinAtar:
    """One MinAtar game. `all_actions` keeps MinAtar's six actions (as its DQN baselines do); False uses the
    game's minimal set (Breakout: no-op, left, right)."""

    def __init__(self, game: str, *, seed: int = 0, size: tuple[int, int] = NATIVE_SIZE,
                 sticky: float = STICKY_PROB, all_actions: bool = True, ramping: bool = True):
        check_game(game)
        if not 0.0 <= float(sticky) <= 1.0:
            raise ValueError(f"minatar.sticky must be a probability in [0, 1], got {sticky}")
        from minatar import Environment

        self._game = game
        self._env = Environment(game, sticky_action_prob=float(sticky), difficulty_ramping=bool(ramping))
        self._env.seed(int(seed))
        self._size = (int(size[0]), int(size[1]))
        self._actions = list(range(self._env.num_actions())) if all_actions else self._env.minimal_action_set()
        channels = int(self._env.state_shape()[2])
        self.obs_space = {"image": base.image_space(self._size, channels), **base.flag_spaces()}
        self.act_space = base.discrete_act_space(len(self._actions))

    def reset(self) -> dict[str, np.ndarray]:
        self._env.reset()
        return self._obs(0.0, first=True)

    def step(self, action: Mapping[str, Any]) -> dict[str, np.ndarray]:
        index = base.discrete_index(action, len(self._actions))
        reward, done = self._env.act(self._actions[index])
        return self._obs(float(reward), last=bool(done), terminal=bool(done) and self._game not in TIMED_GAMES)

    def close(self) -> None:
        pass  # MinAtar holds no external resources.

    def _obs(self, reward: float, first: bool = False, last: bool = False,
             terminal: bool = False) -> dict[str, np.ndarray]:
        image = np.asarray(self._env.state(), np.uint8) * np.uint8(255)
        if image.shape[:2] != self._size:
            # Nearest neighbour keeps each cell a solid block of one value.
            image = cv2.resize(image, self._size[::-1], interpolation=cv2.INTER_NEAREST)
            image = image.reshape(*self._size, -1)
        obs = {"image": np.ascontiguousarray(image)}
        obs.update(base.flags(reward, first=first, last=last, terminal=terminal))
        return obs
