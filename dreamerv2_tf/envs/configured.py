"""A run's environments as its config describes them: used by training and by evaluation alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dreamerv2_tf import config as configlib
from dreamerv2_tf.envs import Env, make_envs, wrap

CUSTOM_PREFIX = "custom_"  # config.task of runs whose env came from train(env_fn)


def time_limit(config: configlib.Config, mode: str) -> int:
    """Agent steps per episode in `mode`: training episodes may be cut shorter than evaluation ones."""
    return config.train_time_limit if mode == "train" and config.train_time_limit else config.time_limit


def env_kwargs(config: configlib.Config, mode: str) -> dict[str, Any]:
    return dict(action_repeat=config.action_repeat, size=tuple(config.size), time_limit=time_limit(config, mode),
                atari=dict(config.atari), dmc=dict(config.dmc), minatar=dict(config.minatar))


def run_envs(config: configlib.Config, mode: str, seed: int, count: int = 1,
             env_fn: Callable[[], Any] | None = None) -> list[Env]:
    """`count` envs for `mode`, seeded seed, seed + 1, ...: `config.task`'s, or the gymnasium envs
    `env_fn` builds (with the wrappers make_env applies to gym_<id> tasks)."""
    if env_fn is None:
        # A single eval env steps in this process; several step as the train envs do.
        parallel = config.envs_parallel if mode == "train" or count > 1 else "none"
        return make_envs(config.task, count, parallel, seed=seed, mode=mode, **env_kwargs(config, mode))
    from dreamerv2_tf.envs.gym import GymEnv

    return [wrap(GymEnv(env_fn(), seed=seed + index, size=tuple(config.size)), config.action_repeat,
                 time_limit(config, mode)) for index in range(count)]


__all__ = ["CUSTOM_PREFIX", "time_limit", "env_kwargs", "run_envs"]
