"""The training loop: prefill, collect, update, evaluate, log, checkpoint, resume."""

from __future__ import annotations

import collections
import errno
import math
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dreamerv2_tf import config as configlib
from dreamerv2_tf.evaluate import CUSTOM_PREFIX
from dreamerv2_tf.logger import METRICS_FILE, Logger, Progress, read_metrics
from dreamerv2_tf.replay import filename_length
from dreamerv2_tf.runlock import LogdirInUse, RunLock

# float16: a run stops after this many updates in a row that the loss scaler skipped (non-finite gradients).
MAX_SKIPPED_IN_A_ROW = 20
# Prefill gives up when this many episodes were refused for non-finite values and none was stored.
PREFILL_REFUSED_LIMIT = 10

# Keys that may differ between the saved config of a logdir and a resumed run.
# Changing any other key that shapes the networks or optimizers is refused.
ARCHITECTURE_PREFIXES = (
    "task", "size", "action_repeat", "atari.grayscale", "precision", "pred_discount", "slow_target",
    "rssm.", "encoder.", "decoder.", "reward_head.", "discount_head.", "actor.", "critic.",
    "model_opt.", "actor_opt.", "critic_opt.",
)


class Aborted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: the run ends at once, without saving (exit status 128 + signal number).

    A KeyboardInterrupt, so no `except Exception` on the way out swallows it.
    """

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_status = 128 + signum
        super().__init__(f"received {signal.Signals(signum).name} again: aborted without saving")


class Stop:
    """Turns SIGINT/SIGTERM into a flag: the loop finishes its update, saves and exits 0.

    A second signal raises Aborted: the user (or the scheduler) does not want to wait for the save.
    """

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
            raise Aborted(signum)
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
    """Run (or resume) training as configured; returns the logdir.

    One process per logdir: while a run holds LOGDIR/run.lock, another is refused with LogdirInUse.
    """
    configlib.validate(config)  # configs from Python (train(..., steps=-1)) are checked like CLI ones
    cluster = None
    if config.strategy != "default":
        # Created before anything else touches TensorFlow: multi_worker configures the runtime.
        from dreamerv2_tf.distribute import Cluster

        cluster = Cluster(config.strategy)
        if cluster.num_workers > 1:  # every worker collects into its own logdir with its own seed
            config = config.update({"logdir": str(cluster.worker_logdir(default_logdir(config))),
                                    "seed": cluster.worker_seed(config.seed)})
    logdir = default_logdir(config)
    created = _create_logdir(logdir)
    lock = RunLock(logdir)
    try:
        lock.acquire()  # before anything is written: a second run on this logdir is refused here
    except OSError as exc:
        raise RunError(f"cannot write to logdir {logdir}: {exc.strerror or exc}", 2) from None
    save_hook: list[Callable[[], None]] = []  # the run's save(), once it exists
    try:
        return _run(config, make_env, cluster, logdir, save_hook)
    except OSError as exc:
        if not save_hook:
            raise
        raise _stopped_by_os_error(exc, save_hook[0], logdir) from None
    finally:
        if created is not None and _holds_only(created, lock.path):
            shutil.rmtree(created, ignore_errors=True)  # refused before writing anything: leave no trace
        lock.release()


def _run(config: configlib.Config, make_env: Callable[[int, str], Any] | None, cluster: Any, logdir: Path,
         save_hook: list[Callable[[], None]]) -> Path:
    """run() once the logdir is locked: nothing but the lock is written before config and task are valid."""
    saved_path = logdir / "config.yaml"
    if saved_path.exists():
        changed = check_resume(configlib.Config.load(saved_path), config)
        if changed:
            print(f"resuming with changed keys: {', '.join(changed)}")
    print(f"logdir: {logdir.resolve()}")
    offline = bool(config.replay.directory)
    replay_dir = Path(config.replay.directory).expanduser() if offline else logdir / "train_episodes"
    if offline and not replay_dir.is_dir():
        raise configlib.ConfigError(f"replay.directory {replay_dir} does not exist")
    task_envs = None
    if make_env is None:  # built before TensorFlow loads, so a misspelt --task fails within a second
        from dreamerv2_tf.envs import make_env as make_task_env
        from dreamerv2_tf.envs import make_envs

        task_envs = (make_envs(config.task, config.envs, config.envs_parallel, seed=config.seed, mode="train",
                               **env_kwargs(config, "train")),
                     make_task_env(config.task, seed=config.seed + 10**4, mode="eval", **env_kwargs(config, "eval")))

    # Imported after the config checks, so a refused resume fails without waiting for TensorFlow.
    import tensorflow as tf

    from dreamerv2_tf.agent import Agent, set_precision
    from dreamerv2_tf.checkpoint import Checkpointer, restore_weights
    from dreamerv2_tf.distribute import Cluster
    from dreamerv2_tf.driver import Driver, random_policy
    from dreamerv2_tf.replay import Replay, space_signature

    cluster = cluster or Cluster("default")
    if cluster.num_replicas > 1 or cluster.num_workers > 1:
        print(f"strategy: {config.strategy} with {cluster.num_replicas} replicas on {cluster.num_workers} "
              f"worker(s){'' if cluster.is_chief else f'; this is worker {cluster.worker.worker_id}'}")
    seed_everything(config.seed, config.deterministic)
    precision = set_precision(config.precision)
    dtypes = {"32": "float32", "16": "mixed float16", "bf16": "mixed bfloat16"}
    origin = "; chosen by precision auto" if config.precision == "auto" else ""
    print(f"precision: {precision} ({dtypes[precision]}{origin})")

    if task_envs is not None:
        train_envs, eval_env = task_envs
    else:  # a caller's env_fn: built after seeding, in case it draws from the global RNGs
        train_envs = [make_env(config.seed + i, "train") for i in range(config.envs)]
        eval_env = make_env(config.seed + 10**4, "eval")
    obs_space, act_space = eval_env.obs_space, eval_env.act_space
    # Episodes must fit the env's spaces: a file that does not is skipped, a folder of another task's
    # episodes is refused with one line (instead of a Keras shape error at the first update).
    signature = space_signature(obs_space, act_space)
    try:
        train_replay = Replay(replay_dir, config.replay.capacity, config.replay.minlen, config.replay.maxlen,
                              config.replay.prioritize_ends, seed=config.seed, sample=config.replay.sample,
                              signature=signature)
    except BaseException:
        for env in [*train_envs, eval_env]:
            env.close()
        raise
    eval_replay = Replay(logdir / "eval_episodes", capacity=max(1, config.eval_eps) * 10**5, seed=config.seed,
                         load=False, signature=signature)
    # Written only now that the config and the task are known to work, so a refused start leaves no
    # config.yaml that the corrected command would then be checked against.
    config.save(saved_path)

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

    step = Counter(_resume_step(logdir, None if offline else replay_dir, int(saved_step.numpy()),
                                train_replay.file_lengths()))
    if step.value:
        print(f"continuing at agent step {step.value:,}")

    divergence = DivergenceCheck(precision, lambda: checkpointer.latest)

    def save() -> None:
        divergence.check_weights(agent.network_variables())  # never replace a good checkpoint by a NaN one
        saved_step.assign(step.value)
        checkpointer.save(step.value)

    save_hook.append(save)  # run() tries it when a write fails (disk full) before reporting the error
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
                result = agent.train(next(dataset), step.value)
                divergence(result, int(agent.step.numpy()))
        updates = int(agent.step.numpy())
        should_train = Every(config.train_every, step.value)
        should_log = Every(config.log_every, step.value)
        should_eval = Every(config.eval_every, _last_eval_step(logdir, config.train_every))  # resumes the schedule
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
                for index in range(config.train_steps):
                    # Checked after every update, so a non-finite state is never saved or trained on.
                    result = divergence(agent.train(next(dataset), step.value), updates + index + 1)
                    for key, value in result.items():
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


class Diverged(ValueError):
    """Training went non-finite; the run stopped without saving. Scripts exit with status 1."""

    exit_status = 1


class DivergenceCheck:
    """Stops a run whose updates go non-finite, before the bad state can be saved or trained on.

    Called with the metrics of each update: in float32 (and bfloat16) any non-finite `*_loss` or
    `*_grad_norm` raises Diverged, since the update has already written NaN into the weights. In float16
    the loss scaler skips an update with non-finite gradients (a non-finite `*_grad_norm`, counted in
    `*_skipped_updates`) and leaves the weights as they were; only `max_skipped` skipped updates in a
    row of one optimizer stop the run. Returns the metrics as floats: they are fetched anyway for
    logging, and fetching them per update costs a few microseconds each.
    """

    def __init__(self, precision: str, last_checkpoint: Callable[[], str | None],
                 max_skipped: int = MAX_SKIPPED_IN_A_ROW):
        self.scaled = precision == "16"
        self.last_checkpoint = last_checkpoint
        self.max_skipped = max_skipped
        self.update = 0
        self._skipped_in_a_row: dict[str, int] = collections.Counter()

    def __call__(self, metrics: Mapping[str, Any], update: int) -> dict[str, float]:
        values = {key: float(value) for key, value in metrics.items()}
        self.update = update
        bad = [key for key, value in values.items()
               if key.endswith(("_loss", "_grad_norm")) and not math.isfinite(value)]
        if not self.scaled:
            if bad:
                self._stop(f"non-finite {', '.join(bad)}")
            return values
        for key, value in values.items():
            if key.endswith("_grad_norm"):
                name = key[:-len("_grad_norm")]
                self._skipped_in_a_row[name] = 0 if math.isfinite(value) else self._skipped_in_a_row[name] + 1
        over = sorted(name for name, count in self._skipped_in_a_row.items() if count > self.max_skipped)
        if over:
            count = max(self._skipped_in_a_row[name] for name in over)
            self._stop(f"the float16 loss scaler skipped {count} updates in a row (non-finite gradients) for "
                       f"the {', '.join(over)} optimizer{'s' if len(over) > 1 else ''}; non-finite "
                       f"{', '.join(bad) or 'gradients'}")
        return values

    def check_weights(self, variables: Sequence[Any]) -> None:
        """Raise Diverged when a weight is NaN or inf (checked before every save)."""
        from dreamerv2_tf.agent import nonfinite_variables

        bad = nonfinite_variables(variables)
        if bad:
            self._stop(f"non-finite weights in {len(bad)} variables, e.g. {bad[0]}")

    def _stop(self, what: str) -> None:
        latest = self.last_checkpoint()
        where = f"the last good checkpoint is {latest}" if latest else "no checkpoint had been saved yet"
        raise Diverged(f"training diverged at update {self.update:,}: {what}; stopped without saving, {where}")


def _resume_step(logdir: Path, replay_dir: Path | None, saved: int, known: Mapping[str, int] | None = None) -> int:
    """The agent step a (resumed) run continues from.

    Steps of an episode still running at a crash are not on disk, so the step
    counted from episode files can lag the one a checkpoint or a log line
    already reached; the largest of the three keeps steps in metrics.jsonl and
    TensorBoard increasing. `known` holds the lengths the replay read (see
    `_episode_lengths`).
    """
    candidates = [saved, sum(_episode_lengths(replay_dir, known)) if replay_dir is not None else 0]
    if (logdir / METRICS_FILE).is_file():
        candidates += [int(record.get("step", 0)) for record in read_metrics(logdir, null_as_nan=False)]
    return max(candidates)


def _episode_lengths(directory: Path, known: Mapping[str, int] | None = None) -> list[int]:
    """Episode lengths (agent steps) of the episode files in `directory`.

    A file the replay read counts with the length it loaded (`known`, from `Replay.file_lengths`; 0 for
    a file it skipped), so a damaged or foreign file never adds steps. Files it did not read (beyond its
    capacity) count by their name, and only names of the replay's own form `<time>-<id>-<length>.npz`.
    """
    known = known or {}
    lengths = (known[path.name] if path.name in known else filename_length(path)
               for path in directory.glob("*.npz"))
    return [length - 1 for length in lengths if length]


def _last_eval_step(logdir: Path, train_every: int) -> int | None:
    """The agent step of the last logged evaluation, so a resumed run continues the eval schedule.

    Eval metrics are written with the step of the next log line, which comes at least one collection
    (`train_every` steps) after the evaluation at the top of the loop. None when none was logged.
    """
    if not (logdir / METRICS_FILE).is_file():
        return None
    steps = [int(record.get("step", 0)) for record in read_metrics(logdir, null_as_nan=False)
             if "eval_return" in record]
    return max(max(steps) - max(train_every, 1), 0) if steps else None


def _prefill(config, driver, policy, step: Counter, stop: Stop, replay) -> None:
    """Random-policy data up to `prefill` agent steps, and at least one finished episode to train on."""
    if step.value >= config.prefill and replay.num_episodes:
        return
    progress = Progress(config.prefill, "prefill", initial=step.value)
    while (step.value < config.prefill or not replay.num_episodes) and not stop.requested:
        if not replay.num_episodes and replay.refused_episodes >= PREFILL_REFUSED_LIMIT:
            # Every episode so far had NaN or inf values: waiting for a clean one could take forever.
            raise ValueError(f"the environment's first {replay.refused_episodes} episodes all held non-finite "
                             f"values (see the warnings above), so {replay.directory} has none to train on")
        driver(policy, steps=max(1, min(100, config.prefill - step.value)))
        progress.update_to(step.value)
    progress.close()
    driver.reset()


class RunError(RuntimeError):
    """A run that cannot start or had to stop for a reason outside its config; one line, `exit_status`."""

    def __init__(self, message: str, exit_status: int = 1):
        super().__init__(message)
        self.exit_status = exit_status


def _create_logdir(logdir: Path) -> Path | None:
    """Create `logdir` and its missing parents; returns the topmost directory created (None: it existed).

    A path that is, or lies under, something other than a directory is refused naming that path.
    """
    missing = None
    for path in (logdir, *logdir.parents):
        if path.is_dir():
            break
        if path.exists() or path.is_symlink():
            kind = "a file" if path.is_file() else "not a directory"
            where = "is" if path == logdir else f"lies under {path}, which is"
            raise configlib.ConfigError(f"--logdir {logdir} {where} {kind}; give a directory")
        missing = path
    if missing is None:
        return None
    try:
        logdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot create logdir {logdir}: {exc.strerror or exc}", 2) from None
    return missing


def _holds_only(directory: Path, lock_file: Path) -> bool:
    """Whether `directory` holds nothing but (empty) directories and the lock file."""
    return all(path == lock_file or path.is_dir() for path in directory.rglob("*"))


def _stopped_by_os_error(exc: OSError, save: Callable[[], None], logdir: Path) -> BaseException:
    """A write failed during the run (disk full, ...): try to save, then report both in one line.

    Nothing on disk is damaged by the failed write: checkpoints and episodes are renamed into place
    only when complete and metrics.jsonl gets whole lines, so the run can resume once there is space.
    """
    if exc.errno is None:  # not from the OS: a message of ours, reported as it is
        return exc
    cause = f"{exc.strerror or exc} ({exc.filename or f'writing in {logdir}'})"
    try:
        save()
    except Exception as again:  # noqa: BLE001 - the first error is the one to report
        text = _os_error_text(again) if isinstance(again, OSError) else str(again).splitlines()[0]
        outcome = f"saving a checkpoint failed too ({text}); the checkpoints saved before are intact"
    else:
        outcome = "saved a checkpoint before stopping"
    what = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "stopped"
    return RunError(f"{what}: {cause}; {outcome}", 1)


def _os_error_text(exc: OSError) -> str:
    if exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def main(argv: list[str] | None = None) -> None:
    config = configlib.from_cli(argv, prog="train.py")
    try:
        run(config)
    except Aborted as exc:  # a second Ctrl-C / SIGTERM
        configlib.fail(str(exc), exc.exit_status)
    except KeyboardInterrupt:  # Ctrl-C before the loop could turn it into a stop request
        configlib.fail("interrupted (SIGINT) before training started; nothing was saved", 128 + signal.SIGINT)
    except (configlib.ConfigError, ValueError, LogdirInUse, RunError) as exc:
        configlib.fail(str(exc), getattr(exc, "exit_status", 2))
    except FileNotFoundError as exc:  # ours name the missing thing; the OS's name the path
        configlib.fail(_os_error_text(exc), 2)
    except OSError as exc:
        configlib.fail(_os_error_text(exc), 1)
    sys.exit(0)


__all__ = ["train", "run", "main", "default_logdir", "check_resume"]
