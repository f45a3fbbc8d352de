"""Any gymnasium environment, by id or instance, converted to the env protocol.

Observations: an image Box (uint8, HxW or HxWxC) becomes 'image' resized to
`size`; any other Box, Discrete (one-hot), MultiBinary or MultiDiscrete becomes
a flat float32 vector under 'vector'. Dict observation spaces keep their keys,
each converted the same way. Actions: Discrete -> one-hot; Box -> [-1, 1]
rescaled to the bounds (unbounded dimensions pass through unchanged).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from gymnasium import spaces

from dreamerv2_tf.envs import base

RESERVED = ("reward", *base.FLAG_KEYS)


def make_gym(env_id: str, **kwargs: Any) -> Any:
    """gymnasium.make with a one-line ValueError listing close ids when the id is unknown."""
    import gymnasium

    try:
        return gymnasium.make(env_id, **kwargs)
    except gymnasium.error.Error as exc:
        close = difflib.get_close_matches(env_id, list(gymnasium.registry), n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join('gym_' + item for item in close)}" if close else ""
        raise ValueError(f"unknown gymnasium env '{env_id}' ({exc}){hint}") from None


def _is_image(space: spaces.Space) -> bool:
    return (isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) in (2, 3)
            and (len(space.shape) == 2 or space.shape[-1] in (1, 3, 4)))


def _converter(space: spaces.Space, size: tuple[int, int], key: str) -> tuple[spaces.Box, Callable]:
    """Obs space and conversion function for one gymnasium observation space."""
    if _is_image(space):
        channels = 1 if len(space.shape) == 2 else space.shape[-1]
        return base.image_space(size, channels), lambda value: base.resize_image(np.asarray(value), size)
    if isinstance(space, spaces.Box):
        dims = int(np.prod(space.shape)) or 1
        return base.vector_space((dims,)), lambda value: np.asarray(value, np.float32).reshape(-1)
    if isinstance(space, spaces.Discrete):
        n, start = int(space.n), int(space.start)
        return base.vector_space((n,)), lambda value: np.eye(n, dtype=np.float32)[int(value) - start]
    if isinstance(space, (spaces.MultiBinary, spaces.MultiDiscrete)):
        dims = int(np.prod(space.shape))
        return base.vector_space((dims,)), lambda value: np.asarray(value, np.float32).reshape(-1)
    raise ValueError(f"unsupported gymnasium observation space for '{key}': {space}; supported: "
                     "Box, Discrete, MultiBinary, MultiDiscrete and Dict of those")


class GymEnv:
    """Wraps `gymnasium.make(env_id)` or a gymnasium env instance (as `train(env_fn)` passes it);
    terminated -> is_terminal, truncated -> is_last only."""

    def __init__(self, env: str | Any, *, seed: int = 0, size: tuple[int, int] = (64, 64),
                 **make_kwargs: Any):
        if isinstance(env, str):
            env = make_gym(env, **make_kwargs)
        elif make_kwargs:
            raise ValueError(f"GymEnv keyword arguments {sorted(make_kwargs)} apply only to an env id, "
                             "not to an env instance")
        elif not (hasattr(env, "observation_space") and hasattr(env, "action_space") and hasattr(env, "step")):
            raise ValueError(f"expected a gymnasium env id or env instance, got {type(env).__name__}")
        self._env = env
        self._seed: int | None = int(seed)
        size = (int(size[0]), int(size[1]))
        obs_space = self._env.observation_space
        self._converters: dict[str, Callable] = {}
        obs_spaces = {}
        if isinstance(obs_space, spaces.Dict):
            items = dict(obs_space.spaces.items())
        else:
            items = {"image" if _is_image(obs_space) else "vector": obs_space}
        for key, space in items.items():
            if key in RESERVED or key.startswith("log_"):
                raise ValueError(f"gymnasium observation key '{key}' clashes with a reserved key")
            obs_spaces[key], self._converters[key] = _converter(space, size, key)
        self._dict_obs = isinstance(obs_space, spaces.Dict)
        self.obs_space = {**obs_spaces, **base.flag_spaces()}
        act = self._env.action_space
        if isinstance(act, spaces.Discrete):
            self._discrete, self._start = int(act.n), int(act.start)
            self.act_space = base.discrete_act_space(act.n)
        elif isinstance(act, spaces.Box):
            self._discrete = 0
            self._low = np.asarray(act.low, np.float64)
            self._high = np.asarray(act.high, np.float64)
            self._act_dtype = act.dtype
            self.act_space = base.continuous_act_space(int(np.prod(act.shape)))
        else:
            raise ValueError(f"unsupported gymnasium action space {act}; supported: Discrete, Box")

    def reset(self) -> dict[str, np.ndarray]:
        # Seed once; later resets continue the env's own random stream.
        value, _ = self._env.reset(seed=self._seed)
        self._seed = None
        return self._obs(value, 0.0, first=True)

    def step(self, action: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if self._discrete:
            native = base.discrete_index(action, self._discrete) + self._start
        else:
            native = base.rescale_action(action, self._low, self._high).astype(self._act_dtype)
        value, reward, terminated, truncated, _ = self._env.step(native)
        last = bool(terminated or truncated)
        return self._obs(value, float(reward), last=last, terminal=bool(terminated))

    def close(self) -> None:
        self._env.close()

    def _obs(self, value: Any, reward: float, first: bool = False, last: bool = False,
             terminal: bool = False) -> dict[str, np.ndarray]:
        values = value if self._dict_obs else {next(iter(self._converters)): value}
        obs = {key: convert(values[key]) for key, convert in self._converters.items()}
        obs.update(base.flags(reward, first=first, last=last, terminal=terminal))
        return obs
