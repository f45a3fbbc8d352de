"""Time the authors' DreamerV2 release on this machine, for comparison with scripts/bench.py.

The release is the `dreamerv2` package on PyPI (2.2.0). `scripts/setup.sh` installs it and the few
modules it imports into `.release/` (requirements-release.txt), without touching this project's
environment; then run this script:

    python scripts/bench_reference.py --path .release --steps 4

It builds the release's agent with its `atari` config in float32 and graph mode (its `jit: True`,
which is how it trains), feeds one synthetic batch of the configured shape, and prints one JSON
line with the update times and, with `--policy_steps`, its policy step times for 1 and 16 envs in
one call (mode train, carrying the state), as `scripts/bench.py` times ours. The release needs
Keras 2, so it runs on tf-keras (TF_USE_LEGACY_KERAS).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", required=True, help="folder the release was installed into with --target")
    parser.add_argument("--steps", type=int, default=4, help="timed updates after one warm-up update")
    parser.add_argument("--policy_steps", type=int, default=0, help="timed policy steps for 1 and 16 envs")
    args = parser.parse_args()
    package = pathlib.Path(args.path) / "dreamerv2"
    if not (package / "agent.py").exists():
        parser.error(f"no dreamerv2 package in {args.path}; install it there first (see --help)")
    from release_side import load_release

    agent, common = load_release(args.path)
    import gym
    import numpy as np
    import ruamel.yaml
    import tensorflow as tf

    configs = ruamel.yaml.YAML(typ="safe").load((package / "configs.yaml").read_text())
    config = common.Config(configs["defaults"]).update(configs["atari"]).update({"precision": 32, "jit": True})
    tf.config.run_functions_eagerly(not config.jit)
    batch, length = config.dataset.batch, config.dataset.length
    flag = gym.spaces.Box(0, 1, (), bool)
    obs_space = {"image": gym.spaces.Box(0, 255, (64, 64, 1), np.uint8),
                 "reward": gym.spaces.Box(-np.inf, np.inf, (), np.float32),
                 "is_first": flag, "is_last": flag, "is_terminal": flag}
    action_space = gym.spaces.Box(0, 1, (18,), np.float32)
    action_space.n = 18  # one-hot Atari actions, as the release's OneHotAction wrapper marks them
    model = agent.Agent(config, obs_space, {"action": action_space}, common.Counter(0))

    rng = np.random.default_rng(0)
    is_first = np.zeros((batch, length), bool)
    is_first[:, 0] = True
    data = {"image": rng.integers(0, 255, (batch, length, 64, 64, 1), np.uint8),
            "action": np.eye(18, dtype=np.float32)[rng.integers(0, 18, (batch, length))],
            "reward": rng.normal(size=(batch, length)).astype(np.float32),
            "is_first": is_first, "is_last": np.zeros_like(is_first), "is_terminal": np.zeros_like(is_first)}
    data = {k: tf.constant(v) for k, v in data.items()}

    def update() -> float:
        start = time.perf_counter()
        _, metrics = model.train(data)
        for value in metrics.values():
            value.numpy()
        return time.perf_counter() - start

    def policy_ms(envs: int) -> float:
        frames = rng.integers(0, 255, (8, envs, 64, 64, 1), np.uint8)
        state = None
        times = []
        for step in range(args.policy_steps + 10):  # the first 10 trace and warm up
            obs = {"image": frames[step % 8], "reward": np.zeros(envs, np.float32),
                   "is_first": np.full(envs, state is None), "is_last": np.zeros(envs, bool),
                   "is_terminal": np.zeros(envs, bool)}
            start = time.perf_counter()
            outputs, state = model.policy(obs, state, mode="train")
            outputs["action"].numpy()
            times.append(time.perf_counter() - start)
        return round(statistics.median(times[10:]) * 1000.0, 3)

    first = update()  # traces the graph
    update()
    times = [update() for _ in range(args.steps)]
    policy = {}
    if args.policy_steps:
        policy = {"policy_step_ms": policy_ms(1), "policy_ms_per_env_step": {"16": round(policy_ms(16) / 16, 3)}}
    print(json.dumps({"implementation": "dreamerv2 2.2.0 (authors' release)", "config": "atari", "precision": 32,
                      "batch": batch, "length": length, "first_update_s": round(first, 1),
                      "train_step_s": {"median": round(statistics.median(times), 3), "min": round(min(times), 3)},
                      **policy,
                      "tensorflow": tf.__version__, "load_avg_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
