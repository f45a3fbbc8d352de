"""Train the authors' release (dreamerv2 2.2.0) with its own training loop on this project's environments.

    python scripts/compare_release_run.py --configs defaults vector --task gym_CartPole-v1 \\
        --logdir runs/release/cartpole/seed0 --seed 0 [--KEY VALUE ...] [--release .release] [--threads 1]

The config is built from `--configs` and the key overrides as in scripts/train.py and every value is handed
to the release under its own key; settings the release cannot express are refused with a one-line error.
The release's `train.py` `main()` then runs as published (its Driver, Replay, Agent and CarryOverState), on
the envs of `dreamerv2_tf.envs` that scripts/train.py would build. It writes its logdir: `config.yaml` (the
release's config), `metrics.jsonl` (`step` in agent steps; `eval_return` per eval episode, `train_return`
per train episode), TensorBoard events, the episodes and `variables.pkl`; scripts/plot.py reads it.

Edits to the release, made as it is loaded (the installed files stay unchanged), each for a reason:
- its configs come from this project's config instead of its configs.yaml and command line;
- its assert that a GPU is present is dropped (it trains on CPUs too; float32 here);
- its `make_env` builds this project's env: a `Discrete(n)` action becomes the one-hot box with `.n` the
  release expects, observation spaces become gym boxes;
- it logs videos only of keys the episode has (its config refuses an empty `log_keys_video`, and its
  default `image` key does not exist on vector envs), and only of frames with 1 or 3 channels (its GIF
  writer fails on MinAtar's 4 object layers);
- its logger counts agent steps, not frames, as this project's `step` does;
- its eval replay refuses episodes shorter than `dataset.length`, and it needs one for the eval report: after
  prefill, random eval episodes (stored, not logged) are collected until one is that long;
- it seeds nothing: Python, numpy and TensorFlow are seeded with `seed`, each replay's RandomState with
  (`seed`, 0) for train and (`seed`, 1) for eval;
- ruamel.yaml 0.18 removed the `safe_dump` that saves its config: a replacement writes plain YAML;
- the Reinforce fix of scripts/release_side.py (the release's own, of March 2022) is applied.

Resuming: the same command continues an interrupted run the way the release does. It reloads the episodes
of `train_episodes/` and `eval_episodes/`, restarts its step counter from them, skips prefill, and loads the
agent's variables from `variables.pkl`, which it writes after each `eval_every` block of training. Episodes
since that save stay in the replay while the agent's training since then is lost. On a finished run
(`finished.json`) the command does nothing. Runs are seeded, but not bit-reproducible: the release's
datasets draw from one RandomState in prefetch threads.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import sys
from collections.abc import Mapping
from typing import Any

from compare_release import RELEASE_FIXED, SHARED, release_overrides
from release_side import load_release_train, release_config

from dreamerv2_tf import cli
from dreamerv2_tf import config as configlib
from dreamerv2_tf.envs import make_env
from dreamerv2_tf.envs.configured import env_kwargs
from dreamerv2_tf.loop.training import EVAL_SEED_OFFSET

ROOT = pathlib.Path(__file__).resolve().parent.parent
FINISHED = "finished.json"
NO_VIDEO_KEY = "none"  # stands for an empty log_keys_video, which the release's config refuses
EVAL_FILL_LIMIT = 1000  # random eval episodes tried before giving up on one of dataset.length steps

# Our keys the release's train.py reads under the same name.
TRAIN_KEYS = ("seed", "task", "envs", "time_limit", "action_repeat", "steps", "log_every", "eval_every", "eval_eps",
              "prefill", "pretrain", "train_every", "train_steps", "expl_until", "log_keys_sum", "log_keys_mean",
              "log_keys_max", "expl_noise", "eval_noise", "eval_state_mean", "replay.capacity", "replay.minlen",
              "replay.maxlen", "replay.prioritize_ends", "replay.ongoing")
# Our keys under another name in the release (recorded in its config.yaml; our env builder applies them).
RENAMED = {"size": "render_size", "dmc.camera": "dmc_camera", "atari.grayscale": "atari_grayscale"}
# Our keys that only this project's env builder reads.
ENV_PREFIXES = ("atari.", "dmc.", "minatar.", "train_time_limit")
# Our keys with the one value the release's loop has.
RELEASE_ONLY = {"deterministic": False, "from_checkpoint": "", "strategy": "default", "envs_parallel": "none",
                "replay.sample": "episode", "replay.directory": "", "dataset.chunks": "shared"}
# Our keys with no effect on the release's loop: it saves variables.pkl after every eval_every block, its
# `jit` (graph mode) is always on, the precision is float32, model_loss exploration is refused above, and
# its train.py sets memory growth on every GPU itself.
IGNORED = ("logdir", "checkpoint_every", "checkpoint_keep", "jit", "precision", "log_keys_video", "expl_model_loss",
           "gpu_memory")


def release_train_config(config: configlib.Config) -> dict[str, Any]:
    """The release's config keys (dotted) for our `config`; ConfigError for settings it cannot express."""
    if config.precision not in ("auto", "32"):
        raise configlib.ConfigError(f"precision {config.precision}: the release's loop runs here in float32 "
                                    "(precision 32 or auto)")
    if not config.logdir:
        raise configlib.ConfigError("--logdir is required")
    flat = config.flat()
    for key, value in RELEASE_ONLY.items():
        if key in flat and flat[key] != value:
            raise configlib.ConfigError(f"{key} {flat[key]!r} has no counterpart in the release's training loop "
                                        f"(it behaves as {value!r})")
    known = (*TRAIN_KEYS, *RENAMED, *RELEASE_ONLY, *IGNORED, *RELEASE_FIXED)  # release_overrides checks the last
    for key in flat:
        shared = any(key == p or (p.endswith(".") and key.startswith(p)) for p in SHARED)
        if not (shared or key in known or key.startswith(ENV_PREFIXES)):
            raise configlib.ConfigError(f"{key} is not handed to the release (classify it in "
                                        "scripts/compare_release_run.py)")
    out = release_overrides(config, "32")
    out.update({key: flat[key] for key in TRAIN_KEYS if key in flat})
    out.update({theirs: flat[ours] for ours, theirs in RENAMED.items()})
    out.update(logdir=str(pathlib.Path(config.logdir).expanduser()), jit=True, envs_parallel="none",
               log_keys_video=list(config.log_keys_video) or [NO_VIDEO_KEY])
    return out


class ReleaseEnv:
    """One of our envs with the spaces the release reads: gym boxes, and a one-hot box with `.n` for
    discrete actions (the release's OneHotAction wrapper describes actions so; our envs accept one-hot
    vectors). Observations, flags and the zero-action reset are already the release's protocol."""

    def __init__(self, env: Any, gym: Any):
        self._env = env
        box = gym.spaces.Box
        self.obs_space = {key: box(space.low, space.high, space.shape, space.dtype)
                          for key, space in env.obs_space.items()}
        action = env.act_space["action"]
        if hasattr(action, "n"):
            onehot = box(0, 1, (int(action.n),), "float32")
            onehot.n = int(action.n)
            self.act_space = {"action": onehot}
        else:
            self.act_space = {"action": box(action.low, action.high, action.shape, action.dtype)}

    def reset(self) -> dict:
        return self._env.reset()

    def step(self, action: Mapping) -> dict:
        return self._env.step(action)

    def close(self) -> None:
        self._env.close()


def env_maker(config: configlib.Config, gym: Any):
    """The release's `make_env(mode)`: the n-th call for a mode builds the env our loop seeds seed + n
    (train) or seed + EVAL_SEED_OFFSET + n (eval)."""
    made = {"train": 0, "eval": 0}

    def make(mode: str) -> ReleaseEnv:
        base = config.seed + (EVAL_SEED_OFFSET if mode == "eval" else 0)
        env = make_env(config.task, seed=base + made[mode], mode=mode, **env_kwargs(config, mode))
        made[mode] += 1
        return ReleaseEnv(env, gym)

    return make


def fill_eval_replay(common: Any, replay: Any, envs: list, act_space: Mapping, length: int) -> None:
    """Random eval episodes into the eval replay (not logged) until it holds one of `length` steps, which
    its dataset needs; the release's prefill gives it one episode, and CartPole's are mostly shorter."""
    if replay.stats["loaded_episodes"]:
        return
    driver = common.Driver(envs)
    driver.on_episode(replay.add_episode)
    agent = common.RandomAgent(act_space)
    for _ in range(EVAL_FILL_LIMIT):
        driver(agent, episodes=1)
        if replay.stats["loaded_episodes"]:
            return
    raise RuntimeError(f"no random eval episode of {EVAL_FILL_LIMIT} reached dataset.length {length} steps")


def seeder(seed: int):
    """Seeds the release's train and eval replays, in the order its train.py creates them."""

    def seed_replays(*replays: Any) -> None:
        import numpy as np

        for index, replay in enumerate(replays):
            replay._random = np.random.RandomState([seed, index])

    return seed_replays


class GifSafeTensorBoard:
    """The release's TensorBoard output without the videos its GIF writer cannot encode: those whose
    frames have neither 1 nor 3 channels (MinAtar's object layers)."""

    def __init__(self, output: Any):
        self._output = output

    def __call__(self, summaries: list) -> None:
        kept = [item for item in summaries if len(item[2].shape) != 4 or item[2].shape[-1] in (1, 3)]
        if kept:
            self._output(kept)


# The edits to the release's train.py: (its text, the replacement). Each text must occur exactly once.
TRAIN_EDITS = (
    ("configs = yaml.safe_load((\n      pathlib.Path(sys.argv[0]).parent / 'configs.yaml').read_text())",
     "configs = {'defaults': _project_config}"),
    ("  logger = common.Logger(step, outputs, multiplier=config.action_repeat)",
     "  logger = common.Logger(step, outputs, multiplier=1)"),
    ("      common.TensorBoardOutput(logdir),\n", "      _GifSafeTensorBoard(common.TensorBoardOutput(logdir)),\n"),
    ("  step = common.Counter(train_replay.stats['total_steps'])\n",
     "  _seed_replays(train_replay, eval_replay)\n  step = common.Counter(train_replay.stats['total_steps'])\n"),
    ("  def make_env(mode):\n", "  def make_env(mode):\n    return _project_env(mode)\n"),
    ("      for key in config.log_keys_video:\n", "      for key in [k for k in config.log_keys_video if k in ep]:\n"),
    ("  print('Create agent.')\n",
     "  _fill_eval_replay(common, eval_replay, eval_envs, act_space, config.dataset.length)\n"
     "  print('Create agent.')\n"),
)


def finished(logdir: pathlib.Path, steps: float) -> bool:
    try:
        return json.loads((logdir / FINISHED).read_text())["steps"] >= steps
    except (OSError, ValueError, KeyError, TypeError):
        return False


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--release", default=str(ROOT / ".release"),
                        help="folder the release was installed into with pip --target")
    parser.add_argument("--threads", type=int, default=0,
                        help="TensorFlow intra- and inter-op threads (0: TensorFlow's choice)")
    if any(token in ("-h", "--help") for token in argv):
        print(__doc__)
        sys.exit(0)
    args, rest = parser.parse_known_args(argv)
    if args.threads < 0:
        cli.fail(f"--threads must be 0 or more, got {args.threads}")
    package = pathlib.Path(args.release) / "dreamerv2"
    if not (package / "train.py").exists():
        cli.fail(f"no dreamerv2 release in {args.release}; install it there with pip --target (scripts/setup.sh)")
    config = cli.from_cli(rest, prog="compare_release_run.py")
    try:
        overrides = release_train_config(config)
    except configlib.ConfigError as exc:
        cli.fail(str(exc))
    logdir = pathlib.Path(overrides["logdir"])
    if finished(logdir, config.steps):
        print(f"{logdir} already holds a finished run of {config.steps:g} agent steps")
        return

    try:
        train, common = load_release_train(args.release, TRAIN_EDITS)
    except RuntimeError as exc:  # another version of the release: its text differs where it is edited
        cli.fail(str(exc))
    import gym
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    seed_release(config.seed)
    train.__dict__.update(_project_config=dict(release_config(common, package, overrides)),
                          _project_env=env_maker(config, gym), _seed_replays=seeder(config.seed),
                          _fill_eval_replay=fill_eval_replay, _GifSafeTensorBoard=GifSafeTensorBoard)
    sys.argv = [str(package / "train.py")]  # its flags parser reads the command line: nothing more to set
    train.main()
    (logdir / FINISHED).write_text(json.dumps({"steps": config.steps}) + "\n")


def seed_release(seed: int) -> None:
    """Seed Python's and NumPy's generators for the release, and not TensorFlow's.

    With a global TensorFlow seed, every copy of a random op inside the release's nested tf.functions (its
    RSSM's obs_step and img_step, called once per step) gets the same op seed, so all steps of a sequence
    would draw their latents from the same random numbers. Unseeded, as the release leaves it, the draws
    are independent; the release's weights and draws then differ from run to run, its replays' sampling
    (`seeder`) does not.
    """
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
