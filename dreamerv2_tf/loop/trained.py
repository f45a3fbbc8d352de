"""A trained run on disk: where its config and weights are, the spaces its agent was built for, and the
agent with the weights of its newest intact checkpoint. Shared by scripts/eval.py, `load_agent` and
scripts/export.py.

TensorFlow is imported on first use, so a wrong path fails before paying for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces

from dreamerv2_tf import config as configlib
from dreamerv2_tf.envs import base
from dreamerv2_tf.loop.checkpoint import checkpoint_paths, weights_source
from dreamerv2_tf.loop.episodes import EpisodeError, load_episode
from dreamerv2_tf.loop.rundir import train_episodes_dir

CONFIG_FILE = "config.yaml"
# A variable only the continuous actor has (the truncated normal's scale layer).
CONTINUOUS_ACTOR_VARIABLE = "agent/ac/actor/_head/_std/"


def find_run(path: str | Path) -> tuple[Path, Path]:
    """(the run's logdir, where its weights are) for a logdir, its checkpoints/ folder or a checkpoint
    file prefix such as LOGDIR/checkpoints/ckpt-5000. FileNotFoundError when either is missing."""
    path = Path(path).expanduser()
    if not path.exists() and not Path(str(path) + ".index").exists():
        raise FileNotFoundError(f"{path} does not exist")
    weights_source(path)  # no checkpoint there: a one-line FileNotFoundError
    start = path if path.is_dir() else path.parent
    for logdir in (start, start.parent):
        if (logdir / CONFIG_FILE).is_file():
            return logdir, path
    raise FileNotFoundError(f"no {CONFIG_FILE} in {start} or {start.parent}; is {path} inside a training logdir?")


def saved_spaces(logdir: Path, config: configlib.Config, weights: Path) -> tuple[dict, dict]:
    """(obs_space, act_space) of the env the run trained on, without building that env.

    The observation keys, shapes and dtypes and the action size come from the oldest readable episode
    file of the run; whether actions are discrete from the actor in its checkpoint (or `actor.dist`).
    """
    folders = [train_episodes_dir(logdir, config), logdir / "eval_episodes"]
    episode = _first_episode(folders)
    if episode is None:
        raise FileNotFoundError(f"no readable episode file in {' or '.join(map(str, folders))}, which the "
                                "observation keys and shapes are read from")
    obs_space = {key: _box(value.shape[1:], value.dtype) for key, value in episode.items() if key != "action"}
    size = int(episode["action"].shape[-1])
    if config.actor.dist == "auto":
        discrete = not _has_variable(weights, CONTINUOUS_ACTOR_VARIABLE)
    else:
        discrete = config.actor.dist == "onehot"
    act_space = base.discrete_act_space(size) if discrete else base.continuous_act_space(size)
    return obs_space, act_space


def restore_agent(config: configlib.Config, obs_space: Mapping[str, Any], act_space: Mapping[str, Any],
                  weights: str | Path) -> tuple[Any, str]:
    """(Agent built for these spaces with the weights at `weights`, the checkpoint restored).

    `weights` is a checkpoint prefix or a folder (a logdir or its checkpoints/), whose newest intact
    checkpoint is used. ValueError when the weights hold NaN or inf.
    """
    from dreamerv2_tf.algo.agent import Agent, nonfinite_variables, set_precision
    from dreamerv2_tf.loop.checkpoint import restore_weights

    agent = Agent(obs_space, act_space, config, set_precision(config.precision))
    checkpoint = restore_weights(weights, agent)
    # A NaN policy still plays (every action the same), and its return would look like any other score.
    bad = nonfinite_variables(agent.network_variables())
    if bad:
        raise ValueError(f"checkpoint {checkpoint} holds non-finite weights ({len(bad)} variables, e.g. {bad[0]}), "
                         "so its actions would mean nothing; was it saved after the run diverged?")
    return agent, checkpoint


def model_obs_spec(agent: Any, obs_space: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of the observation keys the agent reads."""
    return {key: (tuple(shape), np.dtype(obs_space[key].dtype)) for key, shape in agent.obs_shapes.items()}


def _first_episode(folders: list[Path]) -> dict[str, np.ndarray] | None:
    for folder in folders:
        for path in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
            try:
                return load_episode(path)
            except EpisodeError:
                continue
    return None


def _box(shape: tuple[int, ...], dtype: np.dtype) -> spaces.Box:
    if dtype == np.uint8:
        return spaces.Box(0, 255, shape, np.uint8)
    if dtype == np.dtype(bool):
        return spaces.Box(0, 1, shape, bool)
    return spaces.Box(-np.inf, np.inf, shape, dtype)


def _has_variable(weights: Path, prefix: str) -> bool:
    """Whether the newest readable checkpoint at `weights` (prefix or folder) holds a variable under `prefix`."""
    import tensorflow as tf

    directory = weights_source(weights)
    candidates = [str(weights)] if directory is None else checkpoint_paths(directory)
    for candidate in candidates:
        try:
            return any(name.startswith(prefix) for name, _ in tf.train.list_variables(candidate))
        except (tf.errors.OpError, ValueError):  # a damaged index: the next one
            continue
    return False
