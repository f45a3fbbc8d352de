"""The training loop: prefill, collect, update, evaluate, log, checkpoint, resume."""

from __future__ import annotations

import collections
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dreamerv2_tf import config as configlib
from dreamerv2_tf.evaluate import CUSTOM_PREFIX
from dreamerv2_tf.logger import METRICS_FILE, Logger, Progress, read_metrics
from dreamerv2_tf.replay import filename_length

# Keys that may differ between the saved config of a logdir and a resumed run.
# Changing any other key that shapes the networks or optimizers is refused.
ARCHITECTURE_PREFIXES = (
    "task", "size", "action_repeat", "atari.grayscale", "precision", "pred_discount", "slow_target",
    "rssm.", "encoder.", "decoder.", "reward_head.", "discount_head.", "actor.", "critic.",
    "model_opt.", "actor_opt.", "critic_opt.",
)


class Stop:
    """Turns SIGINT/SIGTERM into a flag: the loop finishes its update, saves and exits 0."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:  # a second signal aborts at once
            raise KeyboardInterrupt
        print(f"\nreceived {signal.Signals(signum).name}: finishing the current step, saving, exiting",
              flush=True)
        self.requested = True


def default_logdir(config: configlib.Config) -> Path:
    return Path(config.logdir).expanduser() if config.logdir else Path("logdir") / config.task / f"seed{config.seed}"


def check_resume(saved: configlib.Config, config: configlib.Config) -> list[str]:
    """Keys that changed since the saved config; raises ConfigError for architecture/optimizer keys."""
    old, new = saved.flat(), config.flat()
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    fatal = [k for k in changed if any(k == p or (p.endswith(".") and k.startswith(p)) for p in ARCHITECTURE_PREFIXES)]
    if fatal:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fatal)
        raise configlib.ConfigError(
            f"cannot resume: the logdir was trained with a different architecture/optimizer ({details}); "
            "use a new --logdir or --from_checkpoint")
    return changed


def seed_everything(seed: int, deterministic: bool) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
        # Under op determinism the global generator (saved in checkpoints) must be created from a seed.
        tf.random.set_global_generator(tf.random.Generator.from_seed(seed))


class Every:
    """True when a growing counter passes the next multiple of `interval` after `last`.

    Without `last` the first call is True. Firing on multiples keeps log and
    checkpoint steps round and evenly spaced, also after resuming mid-interval.
    Never True when interval <= 0.
    """

    def __init__(self, interval: int, last: int | None = None):
        self.interval, self.last = interval, last

    def __call__(self, step: int) -> bool:
        if self.interval <= 0:
            return False
        if self.last is None or step // self.interval > self.last // self.interval:
            self.last = step
            return True
        return False


def time_limit(config: configlib.Config, mode: str) -> int:
    """Agent steps per episode in `mode`: training episodes may be cut shorter than evaluation ones."""
    return config.train_time_limit if mode == "train" and config.train_time_limit else config.time_limit


def env_kwargs(config: configlib.Config, mode: str) -> dict[str, Any]:
    return dict(action_repeat=config.action_repeat, size=tuple(config.size), time_limit=time_limit(config, mode),
                atari=dict(config.atari), dmc=dict(config.dmc))


def episode_metrics(episode: Mapping[str, np.ndarray], prefix: str) -> dict[str, float]:
    metrics = {f"{prefix}_return": float(np.sum(episode["reward"])),
               f"{prefix}_length": float(len(episode["reward"]) - 1)}
    for key, value in episode.items():
        if key == "log_reward":  # the task reward of reward-free variants: a return
            metrics[f"{prefix}_task_return"] = float(np.sum(value))
        elif key.startswith("log_"):  # counters such as achievements: their final value
            metrics[f"{prefix}_{key[4:]}"] = float(np.max(value))
    return metrics


def train(env_fn: Callable[[], Any] | None = None, config: configlib.Config | Mapping | None = None,
          **overrides: Any) -> Path:
    """Train DreamerV2 and return the logdir.

    `env_fn` builds a gymnasium environment (called once for training and once
    for evaluation); without it, `config.task` names the environment. `config`
    is a Config or a mapping of overrides over `defaults`; keyword arguments
    override single keys, e.g. `train(make_env, steps=50000, logdir="runs/x")`.
    """
    if config is None or not isinstance(config, configlib.Config):
        config = configlib.build(["defaults"], dict(config or {}))
    config = config.update(overrides)
    if env_fn is None:
        return run(config)
    first = env_fn()
    spec = getattr(first, "spec", None)
    name = f"gym_{spec.id}" if getattr(spec, "id", None) else "env"
    # Record that `config.task` did not build the env, so scripts/eval.py refuses the run
    # instead of evaluating whatever task the config happens to name.
    config = config.update({"task": f"{CUSTOM_PREFIX}{name}"})
    if not config.logdir:
        config = config.update({"logdir": str(Path("logdir") / config.task / f"seed{config.seed}")})
    pending = [first]

    def make(seed: int, mode: str) -> Any:
        return wrap_gym_env(pending.pop() if pending else env_fn(), config, seed, mode)

    return run(config, make)


def wrap_gym_env(env: Any, config: configlib.Config, seed: int, mode: str) -> Any:
    """A gymnasium env with the wrappers make_env applies to gym_<id> tasks."""
    from dreamerv2_tf.envs import wrap
    from dreamerv2_tf.envs.gym import GymEnv

    return wrap(GymEnv(env, seed=seed, size=tuple(config.size)), config.action_repeat, time_limit(config, mode))


def run(config: configlib.Config, make_env: Callable[[int, str], Any] | None = None) -> Path:
    """Run (or resume) training as configured; returns the logdir."""
    cluster = None
    if config.strategy != "default":
        # Created before anything else touches TensorFlow: multi_worker configures the runtime.
        from dreamerv2_tf.distribute import Cluster

        cluster = Cluster(config.strategy)
        if cluster.num_workers > 1:  # every worker collects into its own logdir with its own seed
            config = config.update({"logdir": str(cluster.worker_logdir(default_logdir(config))),
                                    "seed": cluster.worker_seed(config.seed)})
    logdir = default_logdir(config)
    logdir.mkdir(parents=True, exist_ok=True)
    saved_path = logdir / "config.yaml"
    if saved_path.exists():
        changed = check_resume(configlib.Config.load(saved_path), config)
        if changed:
            print(f"resuming with changed keys: {', '.join(changed)}")
    config.save(saved_path)
    print(f"logdir: {logdir.resolve()}")

    # Imported after the config checks, so a refused resume fails without waiting for TensorFlow.
    import tensorflow as tf

    from dreamerv2_tf.agent import Agent, set_precision
    from dreamerv2_tf.checkpoint import Checkpointer, restore_weights
    from dreamerv2_tf.distribute import Cluster
    from dreamerv2_tf.driver import Driver, random_policy
    from dreamerv2_tf.envs import make_env as make_task_env
    from dreamerv2_tf.envs import make_envs
    from dreamerv2_tf.replay import Replay

    cluster = cluster or Cluster("default")
    if cluster.num_replicas > 1 or cluster.num_workers > 1:
        print(f"strategy: {config.strategy} with {cluster.num_replicas} replicas on {cluster.num_workers} "
              f"worker(s){'' if cluster.is_chief else f'; this is worker {cluster.worker.worker_id}'}")
    seed_everything(config.seed, config.deterministic)
    precision = set_precision(config.precision)
    dtypes = {"32": "float32", "16": "mixed float16", "bf16": "mixed bfloat16"}
    origin = "; chosen by precision auto" if config.precision == "auto" else ""
    print(f"precision: {precision} ({dtypes[precision]}{origin})")

    offline = bool(config.replay.directory)
    replay_dir = Path(config.replay.directory).expanduser() if offline else logdir / "train_episodes"
    if offline and not replay_dir.is_dir():
        raise configlib.ConfigError(f"replay.directory {replay_dir} does not exist")
    train_replay = Replay(replay_dir, config.replay.capacity, config.replay.minlen, config.replay.maxlen,
                          config.replay.prioritize_ends, seed=config.seed)
    eval_replay = Replay(logdir / "eval_episodes", capacity=max(1, config.eval_eps) * 10**5, seed=config.seed,
                         load=False)
    if make_env is None:
        train_envs = make_envs(config.task, config.envs, config.envs_parallel, seed=config.seed, mode="train",
                               **env_kwargs(config, "train"))
        eval_env = make_task_env(config.task, seed=config.seed + 10**4, mode="eval", **env_kwargs(config, "eval"))
    else:
        train_envs = [make_env(config.seed + i, "train") for i in range(config.envs)]
        eval_env = make_env(config.seed + 10**4, "eval")
    obs_space, act_space = eval_env.obs_space, eval_env.act_space

    with cluster.scope():  # variables mirrored on every replica
        agent = Agent(obs_space, act_space, config, precision)
    counts = agent.param_counts()
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    # The agent step is checkpointed too: offline runs have no episodes to count it from.
    saved_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="agent_steps")
    checkpointer = Checkpointer(logdir / "checkpoints", config.checkpoint_keep, agent=agent, step=saved_step)
    resumed = checkpointer.restore()
    if resumed:
        print(f"resumed from {resumed}")
    elif config.from_checkpoint and cluster.is_chief:
        print(f"initialised weights from {restore_weights(config.from_checkpoint, agent)}")
    cluster.broadcast(agent)  # workers continue from the chief's weights (a no-op on one worker)

    step = Counter(_resume_step(logdir, None if offline else replay_dir, int(saved_step.numpy())))
    if step.value:
        print(f"continuing at agent step {step.value:,}")

    def save() -> None:
        saved_step.assign(step.value)
        checkpointer.save(step.value)

    # Only the chief's logs describe the run: other workers' metrics.jsonl would look like extra runs to
    # scripts/scores.py and scripts/plot.py, so they log to a temporary directory (and their terminal).
    log_dir = logdir if cluster.is_chief else Path(tempfile.mkdtemp(prefix="dreamerv2_worker_logs_"))
    logger = Logger(log_dir, lambda: step.value, config.action_repeat)
    last_video = {"train": -10**12}

    def on_episode(prefix, episode, worker):
        metrics = episode_metrics(episode, prefix)
        if prefix == "eval":
            print(f"eval episode: return {metrics['eval_return']:.1f}, length {metrics['eval_length']:.0f}")
        logger.add(metrics)
        for key in agent.video_keys:
            if prefix == "eval" or step.value - last_video["train"] >= config.eval_every:
                logger.video(f"{prefix}_policy_{key}", episode[key])
                last_video[prefix] = step.value

    count_step = lambda tr, w: step.increment(0 if tr["is_first"] else 1)  # noqa: E731
    train_driver = Driver(train_envs, on_step=[train_replay.add_step, count_step],
                          on_episode=[lambda ep, w: on_episode("train", ep, w)])
    eval_driver = Driver([eval_env], on_step=[eval_replay.add_step],
                         on_episode=[lambda ep, w: on_episode("eval", ep, w)])

    with Stop() as stop:
        if not offline:
            _prefill(config, train_driver, random_policy(act_space, len(train_envs), config.seed), step, stop,
                     train_replay)
        if train_replay.num_episodes == 0 and not stop.requested:
            raise configlib.ConfigError(f"no episodes to train on in {replay_dir}")
        # A stop during prefill may leave nothing to sample; the loop below is skipped then anyway.
        dataset = None if stop.requested else iter(cluster.dataset(
            lambda batch: train_replay.dataset(batch, config.dataset.length, prefetch=not config.deterministic),
            config.dataset.batch))
        # Decisions that lead to updates or saves are taken together: every worker must run the same updates.
        if cluster.agree(not resumed and not stop.requested, "chief") and cluster.agree(not stop.requested):
            print(f"pretraining for {config.pretrain} updates")
            for _ in range(config.pretrain):
                agent.train(next(dataset))
        updates = int(agent.step.numpy())
        should_train = Every(config.train_every, step.value)
        should_log = Every(config.log_every, step.value)
        should_eval = Every(config.eval_every)
        should_save = Every(config.checkpoint_every, step.value)
        mode = lambda: "explore" if step.value < config.expl_until else "train"  # noqa: E731
        policy = lambda obs, state: agent.policy(obs, state, mode())  # noqa: E731
        eval_policy = lambda obs, state: agent.policy(obs, state, "eval")  # noqa: E731
        progress = Progress(config.steps, "training", initial=step.value)
        metrics = collections.defaultdict(list)
        logger.rates(updates)
        while cluster.agree(step.value < config.steps, "chief") and cluster.agree(not stop.requested):
            if should_eval(step.value) and config.eval_eps > 0:
                eval_driver.reset()
                for _ in range(config.eval_eps):  # one at a time, so a stop request need not wait for all
                    if stop.requested:
                        break
                    eval_driver(eval_policy, episodes=1)
            if offline:
                step.increment(config.train_every)
            else:
                train_driver(policy, steps=config.train_every)
            if cluster.agree(should_train(step.value), "chief"):
                for _ in range(config.train_steps):
                    for key, value in agent.train(next(dataset)).items():
                        metrics[key].append(value)
                updates += config.train_steps
            if should_log(step.value):
                logger.add({k: float(np.mean(v)) for k, v in metrics.items()})
                metrics.clear()
                logger.add({"replay_steps": train_replay.num_steps, "replay_episodes": train_replay.num_episodes,
                            "updates": updates})
                logger.add({k: v.numpy() for k, v in agent.report(next(dataset)).items()})
                logger.rates(updates)
                logger.write(fps=True)
            if cluster.agree(should_save(step.value), "chief"):
                save()
            progress.update_to(step.value)
        progress.close()
        save()
        logger.write()
        logger.close()
    for env in [*train_envs, eval_env]:
        env.close()
    print(f"{'stopped' if stop.requested else 'finished'} at step {step.value:,}; logdir {logdir}")
    return logdir


class Counter:
    def __init__(self, value: int = 0):
        self.value = int(value)

    def increment(self, amount: int = 1) -> None:
        self.value += amount


def _resume_step(logdir: Path, replay_dir: Path | None, saved: int) -> int:
    """The agent step a (resumed) run continues from.

    Steps of an episode still running at a crash are not on disk, so the step
    counted from episode files can lag the one a checkpoint or a log line
    already reached; the largest of the three keeps steps in metrics.jsonl and
    TensorBoard increasing.
    """
    candidates = [saved, sum(_episode_lengths(replay_dir)) if replay_dir is not None else 0]
    if (logdir / METRICS_FILE).is_file():
        candidates += [int(record.get("step", 0)) for record in read_metrics(logdir, null_as_nan=False)]
    return max(candidates)


def _episode_lengths(directory: Path) -> list[int]:
    """Episode lengths (agent steps) from file names `<time>-<id>-<length>.npz`."""
    lengths = (filename_length(path) for path in directory.glob("*.npz"))
    return [length - 1 for length in lengths if length is not None]


def _prefill(config, driver, policy, step: Counter, stop: Stop, replay) -> None:
    """Random-policy data up to `prefill` agent steps, and at least one finished episode to train on."""
    if step.value >= config.prefill and replay.num_episodes:
        return
    progress = Progress(config.prefill, "prefill", initial=step.value)
    while (step.value < config.prefill or not replay.num_episodes) and not stop.requested:
        driver(policy, steps=max(1, min(100, config.prefill - step.value)))
        progress.update_to(step.value)
    progress.close()
    driver.reset()


def main(argv: list[str] | None = None) -> None:
    config = configlib.from_cli(argv, prog="train.py")
    try:
        run(config)
    except (configlib.ConfigError, FileNotFoundError, ValueError) as exc:
        configlib.fail(str(exc))
    sys.exit(0)


__all__ = ["train", "run", "main", "default_logdir", "check_resume"]
