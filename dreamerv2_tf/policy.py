"""A trained agent for your own loop: `load_agent(logdir)`, then `initial_state()` and `act(obs, state)`.

Numpy in and out. An observation is what a gymnasium env returns (an array or a dict of arrays), or the
project's dict observation with `is_first`; images are resized and vectors flattened as the project's
gymnasium wrapper does. An action is what a gymnasium env takes: an integer for discrete actions, a
float32 vector in [-1, 1] for continuous ones (rescale it to a Box with other bounds).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dreamerv2_tf import config as configlib
from dreamerv2_tf.envs.base import resize_image
from dreamerv2_tf.loop import trained

State = dict[str, np.ndarray]
KEY = "key"  # the state entry that seeds the policy's random draws (int32 [2], no batch axis)


def load_agent(logdir_or_checkpoint: str | Path, seed: int | None = None) -> Policy:
    """The policy of a trained run: a logdir, its checkpoints/ folder or one checkpoint (ckpt-N).

    Reads the run's config.yaml and restores the newest checkpoint that reads back completely (skipping
    damaged ones with a warning, as scripts/eval.py does). The observation keys come from one episode
    file of the run; no environment is built. `seed` seeds the keys of initial states made without one.
    """
    logdir, weights = trained.find_run(logdir_or_checkpoint)
    config = configlib.load_run(logdir)
    obs_space, act_space = trained.saved_spaces(logdir, config, weights)
    agent, checkpoint = trained.restore_agent(config, obs_space, act_space, weights)
    return Policy(agent, obs_space, checkpoint, config.seed if seed is None else seed)


class Policy:
    """The recurrent policy of a restored agent. Start every episode from `initial_state()`."""

    def __init__(self, agent: Any, obs_space: Mapping[str, Any], checkpoint: str, seed: int = 0):
        self.agent, self.checkpoint = agent, checkpoint
        self.discrete = bool(agent.discrete)
        self.action_size = int(agent.act_dim)
        self.obs_spec = trained.model_obs_spec(agent, obs_space)
        self._seeds = np.random.default_rng(seed)

    def initial_state(self, batch_size: int = 1, seed: int | None = None) -> State:
        """The state before the first step of `batch_size` episodes: zeros, and the key of the policy's
        random draws made from `seed` (else from the seed given to `load_agent`)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        seed = int(self._seeds.integers(2**63)) if seed is None else seed
        return state_to_numpy(self.agent.initial_state(int(batch_size), seed))

    def act(self, obs: Any, state: State, mode: str = "eval") -> tuple[np.ndarray, State]:
        """(action, next state). With a state of batch size 1, `obs` is one observation and the action
        one action; with batch size N, every observation key and the action have a leading axis of N.
        `mode`: eval (the actor's mode), train (sampled), explore or random."""
        batch = int(state["deter"].shape[0])
        action, new_state = self.agent.policy(self.model_inputs(obs, batch), state_to_tensors(state), mode)
        action = action["action"]
        if self.discrete:
            action = np.argmax(action, -1)
        return (action if batch > 1 else action[0]), state_to_numpy(new_state)

    def model_inputs(self, obs: Any, batch: int) -> dict[str, np.ndarray]:
        """The model's inputs [batch, ...], with `is_first` (False where `obs` does not say)."""
        if not isinstance(obs, Mapping):
            if len(self.obs_spec) != 1:
                raise ValueError(f"the agent reads the observation keys {', '.join(self.obs_spec)}; pass a dict")
            obs = {next(iter(self.obs_spec)): obs}
        missing = [key for key in self.obs_spec if key not in obs]
        if missing:
            raise ValueError(f"observation lacks the keys {', '.join(missing)} that the agent reads "
                             f"(it has {', '.join(map(str, obs)) or 'none'})")
        inputs = {key: _convert(key, obs[key], shape, dtype, batch) for key, (shape, dtype) in self.obs_spec.items()}
        first = np.asarray(obs.get("is_first", False), bool).reshape(-1)
        if first.size not in (1, batch):
            raise ValueError(f"is_first has {first.size} values for a batch of {batch}")
        inputs["is_first"] = np.broadcast_to(first, (batch,)).copy()
        return inputs


def _convert(key: str, value: Any, shape: tuple[int, ...], dtype: np.dtype, batch: int) -> np.ndarray:
    """One observation key as the model reads it: [batch, *shape]."""
    value = np.asarray(value)
    if batch == 1:
        items = [value[0] if value.ndim == len(shape) + 1 and len(value) == 1 else value]  # [1, ...] too
    elif value.ndim == 0 or len(value) != batch:
        raise ValueError(f"observation '{key}' has shape {value.shape}; a state of batch size {batch} needs "
                         f"{batch} observations along the first axis")
    else:
        items = list(value)
    return np.stack([_convert_one(key, np.asarray(item), shape, dtype) for item in items])


def _convert_one(key: str, value: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if len(shape) == 3:  # an image: HxW or HxWxC, resized to the model's size
        if value.ndim in (2, 3):
            value = resize_image(value, shape[:2])
    elif len(shape) == 1:  # a vector: flattened; an integer (a Discrete observation) becomes one-hot
        if value.ndim == 0 and np.issubdtype(value.dtype, np.integer) and shape[0] > 1:
            if not 0 <= int(value) < shape[0]:
                raise ValueError(f"observation '{key}' is {int(value)}; the agent reads one-hot vectors of "
                                 f"{shape[0]} classes")
            value = np.eye(shape[0])[int(value)]
        value = value.reshape(-1)
    if value.shape != shape:
        raise ValueError(f"observation '{key}' has shape {value.shape}; the agent reads {shape}")
    return value.astype(dtype)


def state_to_numpy(state: Any) -> State:
    """The agent's state (latent, action, key) as one flat dict of numpy arrays."""
    latent, action, key = state
    return {**{name: np.asarray(value) for name, value in latent.items()}, "action": np.asarray(action),
            KEY: np.asarray(key)}


def state_to_tensors(state: State) -> tuple:
    """Inverse of `state_to_numpy`."""
    import tensorflow as tf

    latent = {name: tf.convert_to_tensor(value) for name, value in state.items() if name not in ("action", KEY)}
    return latent, tf.convert_to_tensor(state["action"]), tf.convert_to_tensor(state[KEY])
