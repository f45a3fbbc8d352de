"""A run's logdir: creating and locking it, the checks for resuming, and where a resumed run continues."""

from __future__ import annotations

import contextlib
import errno
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from dreamerv2_tf import config as configlib
from dreamerv2_tf.loop.episodes import filename_length
from dreamerv2_tf.loop.logger import METRICS_FILE, read_metrics
from dreamerv2_tf.loop.runlock import RunLock

# Keys that may differ between the saved config of a logdir and a resumed run.
# Changing any other key that shapes the networks or optimizers is refused.
ARCHITECTURE_PREFIXES = (
    "task", "size", "action_repeat", "atari.grayscale", "precision", "pred_discount", "slow_target",
    "rssm.", "encoder.", "decoder.", "reward_head.", "discount_head.", "actor.", "critic.",
    "model_opt.", "actor_opt.", "critic_opt.",
)


class RunError(RuntimeError):
    """A run that cannot start or had to stop for a reason outside its config; one line, `exit_status`."""

    def __init__(self, message: str, exit_status: int = 1):
        super().__init__(message)
        self.exit_status = exit_status


def default_logdir(config: configlib.Config) -> Path:
    return Path(config.logdir).expanduser() if config.logdir else Path("logdir") / config.task / f"seed{config.seed}"


def train_episodes_dir(logdir: Path, config: configlib.Config) -> Path:
    """The episodes a run trains on: LOGDIR/train_episodes, or replay.directory for offline runs."""
    return Path(config.replay.directory).expanduser() if config.replay.directory else logdir / "train_episodes"


@contextlib.contextmanager
def locked_logdir(logdir: Path) -> Iterator[None]:
    """Create and lock `logdir` for one run: while it is held, another run on it is refused with LogdirInUse.

    A logdir this run created and left holding nothing (a refused start) is removed again.
    """
    created = _create_logdir(logdir)
    lock = RunLock(logdir)
    try:
        lock.acquire()  # before anything is written: a second run on this logdir is refused here
    except OSError as exc:
        raise RunError(f"cannot write to logdir {logdir}: {exc.strerror or exc}", 2) from None
    try:
        yield
    finally:
        if created is not None and _holds_only(created, lock.path):
            shutil.rmtree(created, ignore_errors=True)  # refused before writing anything: leave no trace
        lock.release()


def saved_config(logdir: Path) -> configlib.Config | None:
    """The config.yaml a run wrote in `logdir`, or None when it has none.

    An empty file counts as none, with a warning: all it could say is "every key at its default", which is
    almost never what the run used. Its checkpoints are still checked against the agent when it is built.
    """
    path = logdir / "config.yaml"
    if not path.exists():
        return None
    saved = configlib.Config.load(path)  # ConfigError, one line, for a file that is not YAML
    if not saved:
        warnings.warn(f"{path} is empty; treating it as missing (it is written again once the run starts)",
                      RuntimeWarning, stacklevel=2)
        return None
    return saved


def check_resume(saved: configlib.Config, config: configlib.Config) -> list[str]:
    """Keys that changed since the saved config; raises ConfigError for architecture/optimizer keys.

    A key the saved config lacks is an option added since the run, which ran with its default.
    """
    old, new = {**configlib.build(["defaults"]).flat(), **saved.flat()}, config.flat()
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    fatal = [k for k in changed if any(k == p or (p.endswith(".") and k.startswith(p)) for p in ARCHITECTURE_PREFIXES)]
    if fatal:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fatal)
        raise configlib.ConfigError(
            f"cannot resume: the logdir was trained with a different architecture/optimizer ({details}); "
            "use a new --logdir or --from_checkpoint")
    return changed


def resume_step(logdir: Path, replay_dir: Path | None, saved: int, known: Mapping[str, int] | None = None) -> int:
    """The agent step a (resumed) run continues from.

    Steps of an episode still running at a crash are not on disk, so the step
    counted from episode files can lag the one a checkpoint or a log line
    already reached; the largest of the three keeps steps in metrics.jsonl and
    TensorBoard increasing. `known` holds the lengths the replay read (see
    `episode_lengths`).
    """
    candidates = [saved, sum(episode_lengths(replay_dir, known)) if replay_dir is not None else 0]
    if (logdir / METRICS_FILE).is_file():
        candidates += [int(record.get("step", 0)) for record in read_metrics(logdir, null_as_nan=False)]
    return max(candidates)


def episode_lengths(directory: Path, known: Mapping[str, int] | None = None) -> list[int]:
    """Episode lengths (agent steps) of the episode files in `directory`.

    A file the replay read counts with the length it loaded (`known`, from `Replay.file_lengths`; 0 for
    a file it skipped), so a damaged or foreign file never adds steps. Files it did not read (beyond its
    capacity) count by their name, and only names of the replay's own form `<time>-<id>-<length>.npz`.
    """
    known = known or {}
    lengths = (known[path.name] if path.name in known else filename_length(path)
               for path in directory.glob("*.npz"))
    return [length - 1 for length in lengths if length]


def last_eval_step(logdir: Path) -> int | None:
    """The agent step of the last logged evaluation (eval returns are written at the step they were
    played), so a resumed run continues the eval schedule. None when none was logged."""
    if not (logdir / METRICS_FILE).is_file():
        return None
    steps = [int(record.get("step", 0)) for record in read_metrics(logdir, null_as_nan=False)
             if "eval_return" in record]
    return max(steps) if steps else None


def stopped_by_os_error(exc: OSError, save: Callable[[], None], logdir: Path) -> BaseException:
    """A write failed during the run (disk full, ...): try to save, then report both in one line.

    Nothing on disk is damaged by the failed write: checkpoints and episodes are renamed into place
    only when complete and metrics.jsonl gets whole lines, so the run can resume once there is space.
    """
    if exc.errno is None:  # not from the OS: a message of ours, reported as it is
        return exc
    cause = f"{exc.strerror or exc} ({exc.filename or f'writing in {logdir}'})"
    what = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "stopped"
    return RunError(f"{what}: {cause}; {save_before_stopping(save)}", 1)


def stopped_by_env(exc: Exception, save: Callable[[], None], step: int) -> RunError:
    """An env failed (envs.guarded.EnvFailed) at agent step `step`: the agent is intact, so save it, then
    report both in one line."""
    return RunError(f"at agent step {step:,}, {exc}; {save_before_stopping(save)}", 1)


def save_before_stopping(save: Callable[[], None]) -> str:
    """Try `save`; what came of it, for the line that reports why the run stopped."""
    try:
        save()
    except Exception as again:  # noqa: BLE001 - the error that stopped the run is the one to report
        text = os_error_text(again) if isinstance(again, OSError) else str(again).splitlines()[0]
        return f"saving a checkpoint failed too ({text}); the checkpoints saved before are intact"
    return "saved a checkpoint before stopping"


def os_error_text(exc: OSError) -> str:
    if exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


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


__all__ = ["RunError", "default_logdir", "train_episodes_dir", "locked_logdir", "saved_config", "check_resume",
           "resume_step", "episode_lengths", "last_eval_step", "stopped_by_os_error", "stopped_by_env",
           "save_before_stopping", "os_error_text", "ARCHITECTURE_PREFIXES"]
