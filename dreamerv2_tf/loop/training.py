"""The training loop: prefill the replay, then collect, train, evaluate, log and save until `steps`."""

from __future__ import annotations

import collections
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dreamerv2_tf import cli
from dreamerv2_tf import config as configlib
from dreamerv2_tf.envs.configured import CUSTOM_PREFIX, run_envs
from dreamerv2_tf.envs.guarded import EnvFailed, guard
from dreamerv2_tf.loop.clocks import Clock, Counter, Every, Stopwatch
from dreamerv2_tf.loop.divergence import Diverged, DivergenceCheck
from dreamerv2_tf.loop.gpu_memory import configure_gpu_memory
from dreamerv2_tf.loop.logger import Logger
from dreamerv2_tf.loop.replay_memory import report_replay_memory
from dreamerv2_tf.loop.rundir import (
    RunError,
    check_resume,
    default_logdir,
    last_eval_step,
    locked_logdir,
    os_error_text,
    resume_step,
    saved_config,
    stopped_by_env,
    stopped_by_os_error,
    train_episodes_dir,
)
from dreamerv2_tf.loop.runlock import LogdirInUse
from dreamerv2_tf.loop.stop import Aborted, Stop
from dreamerv2_tf.loop.terminal import Progress

# Prefill gives up when this many episodes were refused for non-finite values and none was stored.
PREFILL_REFUSED_LIMIT = 10
EVAL_SEED_OFFSET = 10**4  # the eval env's seed is the run's seed + this


def train(env_fn: Callable[[], Any] | None = None, config: configlib.Config | Mapping | None = None,
          **overrides: Any) -> Path:
    """Train DreamerV2 and return the logdir.

    `env_fn` builds a gymnasium environment (called once per training env and once
    for evaluation); without it, `config.task` names the environment. `config`
    is a Config or a mapping of overrides over `defaults`; keyword arguments
    override single keys, e.g. `train(make_env, steps=50000, logdir="runs/x")`.
    An exception from an env stops the run: the agent is saved, then the env's
    exception is raised again, with a note on how the run stopped.
    """
    if config is None or not isinstance(config, configlib.Config):
        config = configlib.build(["defaults"], dict(config or {}))
    config = config.update(overrides)
    if env_fn is not None:
        first = env_fn()
        spec = getattr(first, "spec", None)
        name = f"gym_{spec.id}" if getattr(spec, "id", None) else "env"
        # Record that `config.task` did not build the env, so scripts/eval.py refuses the run
        # instead of evaluating whatever task the config happens to name.
        config = config.update({"task": f"{CUSTOM_PREFIX}{name}"})
        if not config.logdir:
            config = config.update({"logdir": str(default_logdir(config))})
        pending, make = [first], env_fn  # the env built to name the task is the run's first env
        env_fn = lambda: pending.pop() if pending else make()  # noqa: E731
    try:
        return run(config, env_fn)
    except RunError as exc:
        error = exc.__cause__.__cause__ if isinstance(exc.__cause__, EnvFailed) else None
        if error is None:  # not an env's exception (a dead worker process has none)
            raise
        error.add_note(f"dreamerv2_tf: {exc}")
        raise error from error.__cause__  # the caller can catch what their env raises


def run(config: configlib.Config, env_fn: Callable[[], Any] | None = None) -> Path:
    """Run (or resume) training as configured; returns the logdir.

    One process per logdir: while a run holds LOGDIR/run.lock, another is refused with LogdirInUse.
    """
    configlib.validate(config)  # configs from Python (train(..., steps=-1)) are checked like CLI ones
    cluster = None
    if config.strategy != "default":
        print(configure_gpu_memory(config.gpu_memory))  # before the strategy initialises the GPUs
        # Created before anything else touches TensorFlow: multi_worker configures the runtime.
        from dreamerv2_tf.loop.distribute import Cluster

        cluster = Cluster(config.strategy)
        if cluster.num_workers > 1:  # every worker collects into its own logdir with its own seed
            config = config.update({"logdir": str(cluster.worker_logdir(default_logdir(config))),
                                    "seed": cluster.worker_seed(config.seed)})
    logdir = default_logdir(config)
    with locked_logdir(logdir):
        training = None
        try:
            training = Training(config, logdir, env_fn, cluster)
            return training.run()
        except EnvFailed as exc:
            if training is None:
                raise
            raise stopped_by_env(exc, training.save, training.step.value) from exc  # saves first
        except OSError as exc:
            if training is None:
                raise
            raise stopped_by_os_error(exc, training.save, logdir) from None  # tries to save first
        finally:
            if training is not None:
                training.close()


class Training:
    """One run: its envs, replay, agent, checkpoints and logs, and the steps of its loop.

    Built in the order that lets a mistake fail early: the saved config and the task are checked
    before TensorFlow loads, and nothing but the lock is written before both are known to work.
    """

    def __init__(self, config: configlib.Config, logdir: Path, env_fn: Callable[[], Any] | None = None,
                 cluster: Any = None):
        self.config, self.logdir = config, logdir
        self.envs: list[Any] = []
        self.metrics: dict[str, list[float]] = collections.defaultdict(list)  # of the updates since the last log
        self.stopwatch = Stopwatch()  # where the loop's wall clock goes, logged as time_* fractions
        self.stop = Stop()
        try:
            self._setup(env_fn, cluster)
        except BaseException:
            self.close()
            raise

    def _setup(self, env_fn: Callable[[], Any] | None, cluster: Any) -> None:
        config, logdir = self.config, self.logdir
        saved = saved_config(logdir)
        if saved is not None:
            changed = check_resume(saved, config)
            if changed:
                print(f"resuming with changed keys: {', '.join(changed)}")
        print(f"logdir: {logdir.resolve()}")
        self.offline = bool(config.replay.directory)
        self.replay_dir = train_episodes_dir(logdir, config)
        if self.offline and not self.replay_dir.is_dir():
            raise configlib.ConfigError(f"replay.directory {self.replay_dir} does not exist")
        from dreamerv2_tf.loop.checkpoint import has_checkpoint, weights_source

        if config.from_checkpoint and not has_checkpoint(logdir / "checkpoints"):  # not resuming
            weights_source(config.from_checkpoint)  # a wrong path fails before anything is built
        if env_fn is None:  # built before TensorFlow loads, so a misspelt --task fails within a second
            self._make_envs(None)

        from dreamerv2_tf.algo.agent import resolve_jit, set_precision
        from dreamerv2_tf.loop.distribute import Cluster

        if cluster is None:  # (else run() configured it before creating the strategy)
            print(configure_gpu_memory(config.gpu_memory))
        self.cluster = cluster or Cluster("default")
        if self.cluster.num_replicas > 1 or self.cluster.num_workers > 1:
            where = "" if self.cluster.is_chief else f"; this is worker {self.cluster.worker.worker_id}"
            print(f"strategy: {config.strategy} with {self.cluster.num_replicas} replicas on "
                  f"{self.cluster.num_workers} worker(s){where}")
        seed_everything(config.seed, config.deterministic)
        self.precision = set_precision(config.precision)
        dtypes = {"32": "float32", "16": "mixed float16", "bf16": "mixed bfloat16"}
        origin = "; chosen by precision auto" if config.precision == "auto" else ""
        print(f"precision: {self.precision} ({dtypes[self.precision]}{origin})")
        jit = resolve_jit(config.jit)
        origin = f"; chosen by jit auto: {'a GPU' if jit else 'no GPU'}" if config.jit == "auto" else ""
        print(f"jit: {'XLA on' if jit else 'off'} (the train step{origin})")
        if env_fn is not None:  # a caller's env_fn: built after seeding, in case it draws from the global RNGs
            self._make_envs(env_fn)
        self._open_replays()
        self._build_agent()
        # Written only now that the config, the task and any checkpoints to resume are known to fit, so a
        # refused start leaves no config.yaml that the corrected command would then be checked against.
        config.save(logdir / "config.yaml")
        # Only the chief's logs describe the run: other workers' metrics.jsonl would look like extra runs to
        # scripts/scores.py and scripts/plot.py, so they log to a temporary directory (and their terminal).
        log_dir = logdir if self.cluster.is_chief else Path(tempfile.mkdtemp(prefix="dreamerv2_worker_logs_"))
        self.logger = Logger(log_dir, lambda: self.step.value, config.action_repeat)
        self._make_drivers()

    def _make_envs(self, env_fn: Callable[[], Any] | None) -> None:
        """The train envs and, as in the release, min(envs, eval_eps) eval envs that play at once."""
        config = self.config
        self.train_envs = guard(run_envs(config, "train", config.seed, config.envs, env_fn), "train")
        self.envs += self.train_envs
        self.eval_envs = guard(run_envs(config, "eval", config.seed + EVAL_SEED_OFFSET,
                                        min(config.envs, config.eval_eps), env_fn), "eval") if config.eval_eps else []
        self.envs += self.eval_envs
        self.spaces = (self.train_envs[0].obs_space, self.train_envs[0].act_space)

    def _open_replays(self) -> None:
        from dreamerv2_tf.loop.episodes import space_signature
        from dreamerv2_tf.loop.replay import Replay

        config, replay = self.config, self.config.replay
        # Episodes must fit the env's spaces: a file that does not is skipped, a folder of another task's
        # episodes is refused with one line (instead of a Keras shape error at the first update).
        signature = space_signature(*self.spaces)
        self.train_replay = Replay(self.replay_dir, replay.capacity, replay.minlen, replay.maxlen,
                                   replay.prioritize_ends, seed=config.seed, sample=replay.sample,
                                   signature=signature, ongoing=replay.ongoing)
        # As the release: a tenth of the capacity, and whole sequences of the dataset's length (for reports).
        length = config.dataset.length
        self.eval_replay = Replay(self.logdir / "eval_episodes", capacity=replay.capacity // 10, minlen=length,
                                  maxlen=length, seed=config.seed, load=False, signature=signature,
                                  warn_short=False)
        print(report_replay_memory(*self.spaces, replay.capacity, self.eval_replay.capacity))

    def _build_agent(self) -> None:
        import tensorflow as tf

        from dreamerv2_tf.algo.agent import Agent
        from dreamerv2_tf.loop.checkpoint import Checkpointer, restore_weights

        config, cluster = self.config, self.cluster
        with cluster.scope():  # variables mirrored on every replica
            self.agent = Agent(*self.spaces, config, self.precision)
        print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in self.agent.param_counts().items()))
        # The agent step is checkpointed too: offline runs have no episodes to count it from.
        self.saved_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="agent_steps")
        self.checkpointer = Checkpointer(self.logdir / "checkpoints", config.checkpoint_keep, agent=self.agent,
                                         step=self.saved_step)
        self.resumed = self.checkpointer.restore()
        if self.resumed:
            print(f"resumed from {self.resumed}")
        elif config.from_checkpoint and cluster.is_chief:
            print(f"initialised weights from {restore_weights(config.from_checkpoint, self.agent)}")
        cluster.broadcast(self.agent)  # workers continue from the chief's weights (a no-op on one worker)
        self.step = Counter(resume_step(self.logdir, None if self.offline else self.replay_dir,
                                        int(self.saved_step.numpy()), self.train_replay.file_lengths()))
        if self.step.value:
            print(f"continuing at agent step {self.step.value:,}")
        self.updates = int(self.agent.step.numpy())
        self.divergence = DivergenceCheck(self.precision, lambda: self.checkpointer.latest)

    def _make_drivers(self) -> None:
        from dreamerv2_tf.loop.driver import Driver

        count_step = lambda transition, worker: self.step.increment(0 if transition["is_first"] else 1)  # noqa: E731
        self.train_driver = Driver(self.train_envs, on_step=[self.train_replay.add_step, count_step],
                                   on_episode=[lambda episode, worker: self._on_episode("train", episode)],
                                   stopwatch=self.stopwatch)
        self.eval_driver = Driver(self.eval_envs, on_step=[self.eval_replay.add_step],
                                  on_episode=[lambda episode, worker: self._on_episode("eval", episode)]
                                  ) if self.eval_envs else None
        self.last_video = {"train": -10**12}
        self.eval_dataset = None

    def _on_episode(self, prefix: str, episode: Mapping[str, np.ndarray]) -> None:
        config = self.config
        patterns = {"sum": config.log_keys_sum, "mean": config.log_keys_mean, "max": config.log_keys_max}
        metrics = episode_metrics(episode, prefix, patterns)
        self.logger.add(metrics)
        for key in self.agent.video_keys:  # every eval episode, a training episode every eval_every steps
            if prefix == "eval" or self.step.value - self.last_video["train"] >= self.config.eval_every:
                self.logger.video(f"{prefix}_policy_{key}", episode[key])
                self.last_video[prefix] = self.step.value
        if prefix == "eval":  # each eval episode at its own step, as the release writes them
            self.logger.write()

    def run(self) -> Path:
        """Prefill, pretrain, then the loop: the algorithm's steps, each on its own clock.

        The schedule is the release's: `train_steps` updates once per `train_every` agent steps, checked
        after every single transition (so with several envs an update can fall inside a vector step), and
        an evaluation at the start of every block of `eval_every` agent steps.
        """
        config, step, agree = self.config, self.step, self.cluster.agree
        with self.stop:
            if not self.offline:
                self.prefill()
            if self.train_replay.num_episodes == 0 and not self.stop.requested:
                raise configlib.ConfigError(f"no episodes to train on in {self.replay_dir} (none with at least "
                                            f"replay.minlen={config.replay.minlen} transitions)")
            self.pretrain()
            # Clocks whose decision leads to updates or saves agree across workers (the chief's decides).
            chief = lambda due: agree(due, "chief")  # noqa: E731
            self.should_train = Clock(config.train_every, catch_up=True, agree=chief)
            should_eval = Clock(config.eval_every, catch_up=False,
                                last=last_eval_step(self.logdir) if self.resumed else None)
            should_log = Every(config.log_every, step.value)
            should_save = Every(config.checkpoint_every, step.value, agree=chief)
            self.train_driver.on_step(lambda transition, worker: transition["is_first"] or self.train_when_due())
            progress = Progress(config.steps, "training", initial=step.value)
            self.logger.rates(self.updates)
            self.rate_mark = (step.value, self.updates)
            self.stopwatch.start()  # the loop's time starts here, after prefill and pretraining
            while self.running():
                if self.eval_driver and should_eval(step.value):
                    self.evaluate()
                self.collect()
                if should_log(step.value):
                    self.log()
                if should_save(step.value):
                    self.save()
                progress.update_to(step.value)
            progress.close()
            self.save()
            self.logger.write()
            self.logger.close()
        print(f"{'stopped' if self.stop.requested else 'finished'} at step {step.value:,}; logdir {self.logdir}")
        return self.logdir

    def running(self) -> bool:
        """Steps left and no stop requested, as every worker agrees."""
        return (self.cluster.agree(self.step.value < self.config.steps, "chief")
                and self.cluster.agree(not self.stop.requested))

    def prefill(self) -> None:
        """Random actions until `prefill` agent steps and an episode to train on; then, as the release, one
        round of evaluation episodes with random actions, logged as the eval returns of this step."""
        from dreamerv2_tf.loop.driver import random_policy

        act_space, seed = self.spaces[1], self.config.seed
        policy = random_policy(act_space, len(self.train_envs), seed)
        collected = prefill_replay(self.train_driver, policy, self.step, self.train_replay, self.config.prefill,
                                   self.stop)
        if collected and self.eval_driver and not self.stop.requested:
            random_eval = random_policy(act_space, len(self.eval_envs), seed + EVAL_SEED_OFFSET)
            self.eval_driver(random_eval, episodes=1, until=lambda: self.stop.requested)
            self.eval_driver.reset()

    def pretrain(self) -> None:
        """The datasets, then 1 + `pretrain` updates on the prefilled replay (not when resuming): the
        release's first update, which builds its graphs, and then `pretrain` more."""
        config = self.config
        self.carry = None  # the latent state the next update continues from (see Agent.train)
        # A stop during prefill may leave nothing to sample; the loop is skipped then anyway.
        if not self.stop.requested:
            # Under tf.distribute a worker's replicas take consecutive batches: each gets its own streams.
            turns = max(1, self.cluster.num_replicas // self.cluster.num_workers)
            self.dataset = iter(self.cluster.dataset(
                lambda batch: self.train_replay.dataset(batch, config.dataset.length, config.dataset.chunks,
                                                        prefetch=not config.deterministic, turns=turns),
                config.dataset.batch))
            # Reports read their own stream, so that they take nothing from the training streams.
            self.report_dataset = iter(self.train_replay.dataset(config.dataset.batch, config.dataset.length,
                                                                 config.dataset.chunks, prefetch=False))
        if self.cluster.agree(not self.resumed and not self.stop.requested, "chief") and \
                self.cluster.agree(not self.stop.requested):
            print(f"pretraining for 1 + {config.pretrain} updates")
            for _ in range(1 + config.pretrain):
                if not self.cluster.agree(not self.stop.requested):
                    break
                self.update()
        self.updates = int(self.agent.step.numpy())

    def evaluate(self) -> None:
        """At least `eval_eps` episodes with the eval policy on the eval envs (every episode they finish
        meanwhile counts), then the world-model report (open-loop video) on the eval episodes. A stop
        request ends the episodes in play."""
        self.eval_driver.reset()
        with self.stopwatch("eval"):
            self.eval_driver(lambda obs, state: self.agent.policy(obs, state, "eval"), episodes=self.config.eval_eps,
                             until=lambda: self.stop.requested)
            if self.agent.video_keys and self.eval_replay.num_episodes and not self.stop.requested:
                if self.eval_dataset is None:  # sampled on request: only evaluations read it
                    config = self.config
                    self.eval_dataset = iter(self.eval_replay.dataset(config.dataset.batch, config.dataset.length,
                                                                      prefetch=False))
                report = self.agent.report(next(self.eval_dataset))
                self.logger.add({key: value.numpy() for key, value in report.items()}, prefix="eval")

    def collect(self) -> None:
        """One step of every train env into the replay; updates happen in between, when due (offline: the
        counter alone advances)."""
        if self.offline:
            self.step.increment(1)
            self.train_when_due()
            return
        mode = policy_mode(self.step.value, self.config.expl_until)
        self.train_driver(lambda obs, state: self.agent.policy(obs, state, mode), steps=1)

    def train_when_due(self) -> None:
        """`train_steps` updates when the train clock says so (it is asked after every transition)."""
        if self.should_train(self.step.value):
            for _ in range(self.config.train_steps):
                self.update()

    def update(self) -> None:
        """One update on the next batch, continuing the carried latent state, and checked so that a
        non-finite state is never saved or trained on."""
        with self.stopwatch("replay"):
            batch = next(self.dataset)
        with self.stopwatch("update"):  # the check reads the results, so this waits for the update
            metrics, self.carry = self.agent.train(batch, self.step.value, self.carry)
            result = self.divergence(metrics, self.updates + 1)
        self.updates += 1
        for key, value in result.items():
            self.metrics[key].append(value)

    def log(self) -> None:
        """The mean of the update metrics since the last log, the replay's size, a world-model report, and
        the fractions of the wall clock since the last log spent in each part of the loop."""
        logger, replay = self.logger, self.train_replay
        with self.stopwatch("log"):
            logger.add({key: float(np.mean(values)) for key, values in self.metrics.items()})
            self.metrics.clear()
            steps, updates = self.step.value - self.rate_mark[0], self.updates - self.rate_mark[1]
            self.rate_mark = (self.step.value, self.updates)
            logger.add({"replay_steps": replay.num_steps, "replay_episodes": replay.num_episodes,
                        "replay_short_episodes": replay.short_episodes, "updates": self.updates,
                        "updates_per_step": updates / max(steps, 1)})
            logger.add({key: value.numpy() for key, value in self.agent.report(next(self.report_dataset)).items()})
        logger.add(self.stopwatch.fractions())
        logger.rates(self.updates)
        with self.stopwatch("log"):  # counted in the next interval's fractions
            logger.write(fps=True)

    def save(self) -> None:
        """A checkpoint of the agent and the step; never one with NaN weights in place of a good one."""
        with self.stopwatch("save"):
            self.divergence.check_weights(self.agent.network_variables())
            self.saved_step.assign(self.step.value)
            self.checkpointer.save(self.step.value)

    def close(self) -> None:
        for env in self.envs:
            env.close()


def prefill_replay(driver: Any, policy: Any, step: Counter, replay: Any, steps: int, stop: Stop) -> bool:
    """Random-policy data up to `steps` agent steps, and at least one episode held to train on; False when
    there was nothing to do (a resumed run)."""
    if step.value >= steps and replay.num_episodes:
        return False
    progress = Progress(steps, "prefill", initial=step.value)
    while (step.value < steps or not replay.num_episodes) and not stop.requested:
        if not replay.num_episodes and replay.refused_episodes >= PREFILL_REFUSED_LIMIT:
            # Every episode so far had NaN or inf values: waiting for a clean one could take forever.
            raise ValueError(f"the environment's first {replay.refused_episodes} episodes all held non-finite "
                             f"values (see the warnings above), so {replay.directory} has none to train on")
        if step.value >= steps and not replay.num_episodes and replay.short_episodes >= PREFILL_REFUSED_LIMIT:
            raise ValueError(f"all {replay.short_episodes} episodes of the prefill had fewer than replay.minlen="
                             f"{replay.minlen} transitions, so none can be sampled; lower replay.minlen")
        driver(policy, steps=max(1, min(100, steps - step.value)))
        progress.update_to(step.value)
    progress.close()
    driver.reset()
    return True


def policy_mode(step: int, expl_until: int) -> str:
    """The training policy's mode: 'explore' before agent step `expl_until` (for the whole run when it is 0,
    as in the release), then 'train'."""
    return "explore" if not expl_until or step < expl_until else "train"


def seed_everything(seed: int, deterministic: bool) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
        # Under op determinism the global generator (saved in checkpoints) must be created from a seed.
        tf.random.set_global_generator(tf.random.Generator.from_seed(seed))


# Episode statistics by key pattern (config log_keys_sum / _mean / _max, the release's names).
EPISODE_STATS = {"sum": lambda value: np.sum(value), "mean": lambda value: np.mean(value),
                 "max": lambda value: np.max(value, 0).mean()}  # a vector key: the mean of its maxima


def episode_metrics(episode: Mapping[str, np.ndarray], prefix: str,
                    patterns: Mapping[str, str] | None = None) -> dict[str, float]:
    """Return, length, the `log_` keys, and `<prefix>_<stat>_<key>` for every key that `patterns`
    ({'sum' | 'mean' | 'max': regex}) matches from its start."""
    metrics = {f"{prefix}_return": float(np.sum(episode["reward"])),
               f"{prefix}_length": float(len(episode["reward"]) - 1)}
    for key, value in episode.items():
        if key == "log_reward":  # the task reward of reward-free variants: a return
            metrics[f"{prefix}_task_return"] = float(np.sum(value))
        elif key.startswith("log_"):  # counters such as achievements: their final value
            metrics[f"{prefix}_{key[4:]}"] = float(np.max(value))
        for stat, pattern in (patterns or {}).items():
            if re.match(pattern, key):
                metrics[f"{prefix}_{stat}_{key}"] = float(EPISODE_STATS[stat](np.asarray(value, np.float64)))
    return metrics


def main(argv: list[str] | None = None) -> None:
    config = cli.from_cli(argv, prog="train.py")
    try:
        run(config)
    except Aborted as exc:  # a second Ctrl-C / SIGTERM
        cli.fail(str(exc), exc.exit_status)
    except KeyboardInterrupt:  # Ctrl-C before the loop could turn it into a stop request
        cli.fail("interrupted (SIGINT) before training started; nothing was saved", 128 + signal.SIGINT)
    except (configlib.ConfigError, ValueError, LogdirInUse, RunError) as exc:
        cli.fail(str(exc), getattr(exc, "exit_status", 2))
    except FileNotFoundError as exc:  # ours name the missing thing; the OS's name the path
        cli.fail(os_error_text(exc), 2)
    except OSError as exc:
        cli.fail(os_error_text(exc), 1)
    sys.exit(0)


__all__ = ["train", "run", "main", "Training", "Diverged"]
