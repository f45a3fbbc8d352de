"""Steps a list of envs with a batched policy and reports transitions and finished episodes.

A transition is an env observation plus the 'action' that led to it; the first
transition of an episode (right after reset) carries a zero action. Callbacks:

- on_reset(transition, worker): the first transition of each new episode.
- on_step(transition, worker): every transition, including the first one, so
  `on_step(replay.add_step)` stores complete episodes.
- on_episode(episode, worker): the finished episode as a dict of stacked arrays.

`Driver.steps` counts agent steps (env.step calls; resets are not steps) and
`Driver.episodes` finished episodes, both over the driver's lifetime. With a `stopwatch`
(`clocks.Stopwatch`) the time goes to the sections 'policy', 'env' (steps and resets) and
'replay' (the callbacks, which store the transitions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from gymnasium import spaces

from dreamerv2_tf.envs.base import zero_action
from dreamerv2_tf.loop.stop import run_signal_handlers

Policy = Callable[[dict[str, np.ndarray], Any], tuple[Mapping[str, Any], Any]]
Callback = Callable[[dict[str, np.ndarray], int], Any]


def stack_episode(transitions: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([step[key] for step in transitions]) for key in transitions[0]}


class Driver:
    def __init__(self, envs: Sequence[Any], on_step: Sequence[Callback] = (),
                 on_episode: Sequence[Callback] = (), on_reset: Sequence[Callback] = (),
                 stopwatch: Callable[[str], contextlib.AbstractContextManager] | None = None):
        if not envs:
            raise ValueError("Driver needs at least one env")
        self.envs = list(envs)
        self._time = stopwatch or (lambda name: contextlib.nullcontext())
        self._zero_actions = [zero_action(env.act_space) for env in self.envs]
        self._on_step = list(on_step)
        self._on_episode = list(on_episode)
        self._on_reset = list(on_reset)
        self.steps = 0
        self.episodes = 0
        self.reset()

    def on_step(self, callback: Callback) -> None:
        self._on_step.append(callback)

    def on_episode(self, callback: Callback) -> None:
        self._on_episode.append(callback)

    def on_reset(self, callback: Callback) -> None:
        self._on_reset.append(callback)

    def reset(self) -> None:
        """Forget in-progress episodes and the policy state; every env is reset before its next step."""
        self._obs: list[dict[str, np.ndarray] | None] = [None] * len(self.envs)
        self._episodes: list[list[dict[str, np.ndarray]]] = [[] for _ in self.envs]
        self._state: Any = None

    def __call__(self, policy: Policy, steps: int = 0, episodes: int = 0,
                 until: Callable[[], bool] | None = None) -> dict[str, int]:
        """Step all envs until at least `steps` agent steps and `episodes` finished episodes in this call,
        or until `until()` (checked after every step of all envs) returns True."""
        done_steps = done_episodes = 0
        count = len(self.envs)
        while (done_steps < steps or done_episodes < episodes) and not (until and until()):
            run_signal_handlers()  # Ctrl-C (KeyboardInterrupt) takes effect at the next step
            self._reset_finished()
            batch = {key: np.stack([obs[key] for obs in self._obs]) for key in self._obs[0]}
            with self._time("policy"):
                action, self._state = policy(batch, self._state)
                action = {key: np.asarray(value, np.float32) for key, value in action.items()}
            if "action" not in action or action["action"].shape[:1] != (count,):
                shapes = {key: value.shape for key, value in action.items()}
                raise ValueError(f"policy must return {{'action': array of shape ({count}, A)}}, got {shapes}")
            per_env = [{key: value[index] for key, value in action.items()} for index in range(count)]
            with self._time("env"):
                results = self._step_all(per_env)
            with self._time("replay"):
                done = self._record(results, per_env)
            done_steps += count
            self.steps += count
            done_episodes += done
            self.episodes += done
        return {"steps": done_steps, "episodes": done_episodes}

    def _record(self, results: list[dict[str, np.ndarray]], actions: list[dict[str, np.ndarray]]) -> int:
        """Hands each new transition, and each finished episode, to the callbacks; returns the episodes."""
        finished = 0
        for worker, (obs, act) in enumerate(zip(results, actions, strict=True)):
            transition = {**obs, **act}
            self._obs[worker] = obs
            self._episodes[worker].append(transition)
            for callback in self._on_step:
                callback(transition, worker)
            if obs["is_last"]:
                episode = stack_episode(self._episodes[worker])
                for callback in self._on_episode:
                    callback(episode, worker)
                finished += 1
        return finished

    def _reset_finished(self) -> None:
        workers = [index for index, obs in enumerate(self._obs) if obs is None or obs["is_last"]]
        if not workers:
            return
        with self._time("env"):
            observations = self._call_all(workers, "reset", [()] * len(workers))
        with self._time("replay"):
            for worker, obs in zip(workers, observations, strict=True):
                transition = {**obs, **self._zero_actions[worker]}
                self._obs[worker] = obs
                self._episodes[worker] = [transition]
                for callback in self._on_reset:
                    callback(transition, worker)
                for callback in self._on_step:
                    callback(transition, worker)

    def _step_all(self, actions: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return self._call_all(range(len(self.envs)), "step", [(action,) for action in actions])

    def _call_all(self, workers: Sequence[int], method: str, args: Sequence[tuple]) -> list[dict]:
        """Call `method` on the given envs; envs with async variants run concurrently."""
        envs = [self.envs[worker] for worker in workers]
        if all(hasattr(env, f"{method}_async") for env in envs):
            pending = [getattr(env, f"{method}_async")(*arg) for env, arg in zip(envs, args, strict=True)]
            return [env.result(future) for env, future in zip(envs, pending, strict=True)]
        return [getattr(env, method)(*arg) for env, arg in zip(envs, args, strict=True)]


def random_policy(act_space: Mapping[str, spaces.Space] | spaces.Space, num_envs: int = 1,
                  seed: int = 0) -> Policy:
    """Uniform random actions: one-hot for Discrete, uniform in [-1, 1] for Box."""
    space = act_space["action"] if isinstance(act_space, Mapping) else act_space
    rng = np.random.default_rng(seed)

    def policy(obs: Mapping[str, np.ndarray], state: Any = None) -> tuple[dict[str, np.ndarray], Any]:
        count = len(obs["is_first"]) if "is_first" in obs else num_envs
        if isinstance(space, spaces.Discrete):
            action = np.eye(int(space.n), dtype=np.float32)[rng.integers(0, int(space.n), count)]
        elif isinstance(space, spaces.Box):
            action = rng.uniform(-1.0, 1.0, (count, *space.shape)).astype(np.float32)
        else:
            raise ValueError(f"random_policy supports Discrete and Box action spaces, got {space}")
        return {"action": action}, state

    return policy
