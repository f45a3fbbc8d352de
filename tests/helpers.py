"""Tiny shared fixtures for the model tests: configs, gymnasium spaces, random batches, agents."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import gymnasium as gym
import keras
import numpy as np

from dreamerv2_tf.algo.agent import Agent, set_precision
from dreamerv2_tf.config import Config, build

BOOKKEEPING = ("reward", "is_first", "is_last", "is_terminal")


def tiny_config(overrides: Mapping | None = None, names: Sequence[str] = ()) -> Config:
    """The `debug` config (tiny nets, no XLA, float32) plus overrides."""
    return build(["defaults", "debug", *names], dict(overrides or {}))


def obs_space(image: Sequence[int] | None = (64, 64, 3), vector: int | None = None) -> dict[str, gym.Space]:
    """Observation space with an optional uint8 'image' and an optional float 'vector' key."""
    space: dict[str, gym.Space] = {}
    if image is not None:
        space["image"] = gym.spaces.Box(0, 255, tuple(image), np.uint8)
    if vector is not None:
        space["vector"] = gym.spaces.Box(-np.inf, np.inf, (vector,), np.float32)
    space["reward"] = gym.spaces.Box(-np.inf, np.inf, (), np.float32)
    for key in BOOKKEEPING[1:]:
        space[key] = gym.spaces.Box(0, 1, (), bool)
    return space


def discrete_actions(n: int = 3) -> dict[str, gym.Space]:
    return {"action": gym.spaces.Discrete(n)}


def continuous_actions(dim: int = 2) -> dict[str, gym.Space]:
    return {"action": gym.spaces.Box(-1.0, 1.0, (dim,), np.float32)}


def random_actions(act_space: Mapping[str, gym.Space], shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    space = act_space["action"]
    if isinstance(space, gym.spaces.Discrete):
        return np.eye(space.n, dtype=np.float32)[rng.integers(0, space.n, tuple(shape))]
    return rng.uniform(-1, 1, (*shape, *space.shape)).astype(np.float32)


def random_batch(obs: Mapping[str, gym.Space], act: Mapping[str, gym.Space], batch: int = 2, length: int = 6,
                 seed: int = 0, firsts: Sequence[int] = (0,)) -> dict[str, np.ndarray]:
    """A replay-like batch [B, L, ...]; `is_first` is set at the time indices in `firsts`."""
    rng = np.random.default_rng(seed)
    data: dict[str, np.ndarray] = {}
    for key, space in obs.items():
        if key in BOOKKEEPING:
            continue
        if space.dtype == np.uint8:
            data[key] = rng.integers(0, 256, (batch, length, *space.shape), dtype=np.uint8)
        else:
            data[key] = rng.normal(size=(batch, length, *space.shape)).astype(np.float32)
    data["action"] = random_actions(act, (batch, length), rng)
    data["reward"] = rng.normal(size=(batch, length)).astype(np.float32)
    data["is_first"] = np.zeros((batch, length), bool)
    data["is_first"][:, list(firsts)] = True
    data["is_last"] = np.zeros((batch, length), bool)
    data["is_terminal"] = np.zeros((batch, length), bool)
    return data


def first_step(data: Mapping[str, np.ndarray], t: int = 0) -> dict[str, np.ndarray]:
    """Observations at one time index [B, ...], as the driver passes them to the policy."""
    return {k: v[:, t] for k, v in data.items() if k != "action"}


@contextlib.contextmanager
def precision(name: str) -> Iterator[str]:
    """Set the global Keras dtype policy for layers built inside; always restore float32."""
    try:
        yield set_precision(name)
    finally:
        set_precision("32")


def make_agent(obs: Mapping[str, gym.Space], act: Mapping[str, gym.Space], overrides: Mapping | None = None,
               seed: int = 0, names: Sequence[str] = (), prec: str = "32") -> Agent:
    """A tiny agent with seeded initial weights; the dtype policy is restored to float32 afterwards."""
    keras.utils.set_random_seed(seed)
    config = tiny_config(overrides, names)
    with precision(prec):
        return Agent(obs, act, config, precision=prec)
