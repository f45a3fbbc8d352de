"""The environment protocol shared by all tasks, and small helpers to implement it.

Every env returns observations as a flat dict of numpy values: model inputs
('image' uint8 HxWxC and/or float32 vectors), 'reward' float32, the flags
'is_first', 'is_last', 'is_terminal' (bool) and optional 'log_*' keys that are
only logged. Actions arrive as {'action': vector}: a one-hot float vector for
discrete spaces, or a float vector in [-1, 1] for continuous ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
from gymnasium import spaces

FLAG_KEYS = ("is_first", "is_last", "is_terminal")

# True inside a worker process that hosts one env (envs.parallel); such processes never load TensorFlow.
IN_ENV_WORKER = False


@runtime_checkable
class Env(Protocol):
    """What the driver, replay and agent rely on."""

    obs_space: dict[str, spaces.Box]
    act_space: dict[str, spaces.Space]

    def reset(self) -> dict[str, np.ndarray]: ...

    def step(self, action: Mapping[str, Any]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def flag_spaces() -> dict[str, spaces.Box]:
    """Spaces of the reward and episode-boundary keys every env emits."""
    return {
        "reward": spaces.Box(-np.inf, np.inf, (), np.float32),
        "is_first": spaces.Box(0, 1, (), bool),
        "is_last": spaces.Box(0, 1, (), bool),
        "is_terminal": spaces.Box(0, 1, (), bool),
    }


def image_space(size: tuple[int, int], channels: int) -> spaces.Box:
    return spaces.Box(0, 255, (int(size[0]), int(size[1]), channels), np.uint8)


def vector_space(shape: tuple[int, ...]) -> spaces.Box:
    return spaces.Box(-np.inf, np.inf, tuple(shape), np.float32)


def discrete_act_space(n: int) -> dict[str, spaces.Space]:
    return {"action": spaces.Discrete(int(n))}


def continuous_act_space(dims: int) -> dict[str, spaces.Space]:
    return {"action": spaces.Box(-1.0, 1.0, (int(dims),), np.float32)}


def flags(reward: float = 0.0, first: bool = False, last: bool = False,
          terminal: bool = False) -> dict[str, np.ndarray]:
    return {
        "reward": np.float32(reward),
        "is_first": np.bool_(first),
        "is_last": np.bool_(last),
        "is_terminal": np.bool_(terminal),
    }


def discrete_index(action: Mapping[str, Any], n: int) -> int:
    """The chosen index from a one-hot (or any score) vector; a plain integer is accepted too."""
    value = np.asarray(action["action"])
    if value.ndim == 0:
        index = int(value)
    else:
        if value.shape != (n,):
            raise ValueError(f"expected a one-hot action of shape ({n},), got shape {value.shape}")
        index = int(np.argmax(value))
    if not 0 <= index < n:
        raise ValueError(f"action index {index} out of range; valid range is 0..{n - 1}")
    return index


def rescale_action(action: Mapping[str, Any], low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map an action in [-1, 1] to [low, high]; dimensions with infinite bounds pass through."""
    raw = np.asarray(action["action"], np.float64)
    if raw.size != np.size(low):
        raise ValueError(f"expected an action with {np.size(low)} values, got shape {raw.shape}")
    raw = raw.reshape(np.shape(low))
    finite = np.isfinite(low) & np.isfinite(high)
    with np.errstate(invalid="ignore"):  # inf - inf on unbounded dims; those are replaced below
        scaled = low + (np.clip(raw, -1.0, 1.0) + 1.0) / 2.0 * (high - low)
    return np.where(finite, scaled, raw)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A new HxWxC uint8 array resized to size (height, width) with area averaging."""
    height, width = int(size[0]), int(size[1])
    if image.shape[:2] != (height, width):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    else:
        image = np.array(image)  # a copy: callers may reuse their frame buffers
    if image.ndim == 2:
        image = image[:, :, None]
    return np.ascontiguousarray(image, dtype=np.uint8)


def zero_action(act_space: Mapping[str, spaces.Space]) -> dict[str, np.ndarray]:
    """The placeholder action stored with the first step of an episode."""
    space = act_space["action"]
    if isinstance(space, spaces.Discrete):
        return {"action": np.zeros(int(space.n), np.float32)}
    return {"action": np.zeros(space.shape, np.float32)}


def action_size(act_space: Mapping[str, spaces.Space]) -> int:
    space = act_space["action"]
    return int(space.n) if isinstance(space, spaces.Discrete) else int(np.prod(space.shape))
