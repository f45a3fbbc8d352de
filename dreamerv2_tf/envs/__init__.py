"""Environments by task name: atari_<game>, dmc_<domain>_<task>, crafter_(no)reward, minatar_<game>, gym_<id>.

`make_env` builds one env following the protocol in `envs.base`; `make_envs`
builds several, optionally each in its own thread or process.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping
from typing import Any

from dreamerv2_tf.config import CHOICES
from dreamerv2_tf.envs.base import Env, action_size, zero_action
from dreamerv2_tf.envs.wrappers import ActionRepeat, TimeLimit

__all__ = ["Env", "make_env", "make_envs", "check_task", "wrap", "action_size", "zero_action", "PREFIXES", "MODES",
           "PARALLEL"]

PREFIXES = ("atari", "dmc", "crafter", "minatar", "gym")
MODES = ("train", "eval")
PARALLEL = CHOICES["envs_parallel"]
ATARI_DEFAULTS = {"sticky": True, "all_actions": True, "noops": 0, "grayscale": True, "lives": False, "ram": False}
DMC_DEFAULTS = {"camera": -1, "image": True, "scalars": "vector"}
MINATAR_DEFAULTS = {"sticky": 0.1, "all_actions": True, "ramping": True}


def _options(name: str, given: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    options = dict(defaults)
    for key, value in (given or {}).items():
        if key not in defaults:
            raise ValueError(f"unknown {name} option '{key}'; valid options: {', '.join(defaults)}")
        options[key] = value
    return options


def _unknown_task(task: str) -> ValueError:
    from dreamerv2_tf.envs.atari import GAMES

    prefix, _, rest = task.partition("_")
    guesses = []
    if prefix not in PREFIXES and rest:
        guesses = [name + "_" + rest for name in difflib.get_close_matches(prefix, PREFIXES, n=2, cutoff=0.5)]
    if task.lower() in GAMES:
        guesses.append("atari_" + task.lower())
    hint = f" (did you mean {' or '.join(guesses)}?)" if guesses else ""
    return ValueError(f"unknown task '{task}'{hint}; tasks look like atari_<game>, dmc_<domain>_<task>, "
                      "crafter_reward, crafter_noreward, minatar_<game> or gym_<gymnasium id>")


def check_task(task: str) -> None:
    """A one-line ValueError for a task name no suite has, checked without building the env (or loading
    TensorFlow); DMC and gymnasium names are checked when their env is made."""
    prefix, _, rest = task.partition("_")
    if prefix not in PREFIXES or not rest:
        raise _unknown_task(task)
    if prefix == "atari":
        from dreamerv2_tf.envs.atari import ale_name

        ale_name(rest)
    elif prefix == "crafter":
        from dreamerv2_tf.envs.crafter import check_task as check_crafter_task

        check_crafter_task(rest)
    elif prefix == "minatar":
        from dreamerv2_tf.envs.minatar import check_game

        check_game(rest)


def make_env(task: str, *, seed: int = 0, mode: str = "train", action_repeat: int = 1,
             size: tuple[int, int] | list[int] = (64, 64), time_limit: int = 0,
             atari: Mapping[str, Any] | None = None, dmc: Mapping[str, Any] | None = None,
             minatar: Mapping[str, Any] | None = None) -> Env:
    """One env for `task`. `action_repeat` counts env frames per agent step (4 for the Atari
    protocol, whose max-pool needs it done inside the env); `time_limit` counts agent steps and
    ends episodes as a truncation (0 = only the env's own limit)."""
    if mode not in MODES:
        raise ValueError(f"unknown env mode '{mode}'; choices: {', '.join(MODES)}")
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ValueError(f"size must be two positive integers (height, width), got {size!r}")
    if action_repeat < 1:
        raise ValueError(f"action_repeat must be at least 1, got {action_repeat}")
    if time_limit < 0:
        raise ValueError(f"time_limit must be zero (no limit) or positive, got {time_limit}")
    size = (int(size[0]), int(size[1]))
    check_task(task)
    prefix, _, rest = task.partition("_")
    if prefix == "atari":
        from dreamerv2_tf.envs.atari import Atari

        options = _options("atari", atari, ATARI_DEFAULTS)
        env: Any = Atari(rest, seed=seed, action_repeat=action_repeat, size=size,
                         sticky=bool(options["sticky"]), all_actions=bool(options["all_actions"]),
                         noops=int(options["noops"]), grayscale=bool(options["grayscale"]),
                         lives=bool(options["lives"]), ram=bool(options["ram"]))
    elif prefix == "dmc":
        from dreamerv2_tf.envs.dmc import DMC

        options = _options("dmc", dmc, DMC_DEFAULTS)
        env = DMC(rest, seed=seed, action_repeat=action_repeat, size=size, camera=int(options["camera"]),
                  image=bool(options["image"]), scalars=str(options["scalars"]))
    elif prefix == "crafter":
        from dreamerv2_tf.envs.crafter import Crafter

        return wrap(Crafter(rest, seed=seed, size=size), action_repeat, time_limit)
    elif prefix == "minatar":
        from dreamerv2_tf.envs.minatar import MinAtar

        options = _options("minatar", minatar, MINATAR_DEFAULTS)
        return wrap(MinAtar(rest, seed=seed, size=size, sticky=float(options["sticky"]),
                            all_actions=bool(options["all_actions"]), ramping=bool(options["ramping"])),
                    action_repeat, time_limit)
    else:
        from dreamerv2_tf.envs.gym import GymEnv

        return wrap(GymEnv(rest, seed=seed, size=size), action_repeat, time_limit)
    # Atari and DMC repeat actions inside the env (Atari's max-pool needs the last two frames).
    return wrap(env, 1, time_limit)


def wrap(env: Env, action_repeat: int = 1, time_limit: int = 0) -> Env:
    """The ActionRepeat and TimeLimit wrappers, each only where it does something."""
    env = ActionRepeat(env, action_repeat) if action_repeat > 1 else env
    return TimeLimit(env, time_limit) if time_limit else env


def make_envs(task: str, count: int = 1, parallel: str = "none", seed: int = 0, **kwargs: Any) -> list[Env]:
    """`count` envs seeded seed, seed + 1, ...; `parallel` runs each in its own thread or process.

    Keyword arguments are those of `make_env`. Parallel proxies also offer reset_async/step_async.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"unknown envs_parallel '{parallel}'; choices: {', '.join(PARALLEL)}")
    if count < 1:
        raise ValueError(f"number of envs must be at least 1, got {count}")
    # Plain containers: the constructors are pickled for worker processes.
    kwargs = {key: dict(value) if isinstance(value, Mapping) else value for key, value in kwargs.items()}
    if "size" in kwargs:
        kwargs["size"] = tuple(kwargs["size"])
    ctors = [functools.partial(make_env, task, seed=seed + index, **kwargs) for index in range(count)]
    if parallel == "none":
        return [ctor() for ctor in ctors]
    from dreamerv2_tf.envs.parallel import ProcessEnv, ThreadEnv

    proxy = ThreadEnv if parallel == "thread" else ProcessEnv
    envs: list[Env] = []
    try:
        for ctor in ctors:
            envs.append(proxy(ctor))
    except BaseException:
        for env in envs:
            env.close()
        raise
    return envs
