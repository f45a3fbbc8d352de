"""Checkpoints of the agent (weights, optimizer slots, loss scales, slow critic, counters, RNG).

Layout of a checkpoint directory:

  ckpt-<step>.index, ckpt-<step>.data-*   one checkpoint per saved agent step, the newest `keep` kept
  checkpoint                              TensorFlow's index of them (for tf.train.latest_checkpoint)

The files on disk, not the `checkpoint` index, decide what a run resumes from: a run killed between
writing a checkpoint and updating the index (or while the index was replaced) still resumes from it.
A checkpoint is read completely (every tensor, with its checksum) before it is restored, so a
truncated, corrupt or half-deleted newest checkpoint is skipped for the newest one that is intact.

TensorFlow is imported on first use, so the scripts can look for checkpoints before paying for it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tensorflow as tf

PREFIX = "ckpt"
STATE_FILE = "checkpoint"
SAVING_SUFFIX = ".saving"  # a checkpoint being written; renamed to ckpt-<step> once complete
_CHECKPOINT_RE = re.compile(rf"^{PREFIX}-(\d+)\.index$")
_STATE_RE = re.compile(r'^\s*(?:model_checkpoint_path|all_model_checkpoint_paths)\s*:\s*"(.*)"\s*$')
# TensorFlow reports OS errors of its file system layer as text; these name the cause.
_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)


class CheckpointError(ValueError):
    """No usable checkpoint where one was asked for: damaged files or other networks (one line)."""


class DamagedCheckpoint(CheckpointError):
    """The checkpoint asked for, or every checkpoint of a directory, cannot be read back."""


class Checkpointer:
    """Saves and restores the trackables under `directory`, keeping the newest `keep` checkpoints.

    A save writes ckpt-<step>.saving.* and renames the files to ckpt-<step>.* only when complete, then
    updates the `checkpoint` index, then deletes what is not kept: older checkpoints, checkpoints that
    a restore skipped as damaged, and the leftovers of interrupted saves.
    """

    def __init__(self, directory: str | Path, keep: int, **trackables: Any):
        import tensorflow as tf

        self.directory = Path(directory)
        self.keep = max(1, int(keep))
        self._checkpoint = tf.train.Checkpoint(rng=tf.random.get_global_generator(), **trackables)
        self._latest: str | None = None
        self._damaged: set[str] = set()

    @property
    def latest(self) -> str | None:
        """The checkpoint last saved or restored, else the newest one on disk (not yet checked)."""
        if self._latest:
            return self._latest
        found = checkpoint_paths(self.directory)
        return found[0] if found else None

    def save(self, step: int) -> str:
        """Write the checkpoint of agent step `step`; returns its path prefix.

        Disk full, read-only and similar failures raise OSError (errno set, filename the checkpoint)
        after removing the partial files, so the checkpoints already on disk stay as they were.
        """
        import tensorflow as tf

        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{PREFIX}-{int(step)}"
        partial = Path(str(final) + SAVING_SUFFIX)
        self._checkpoint.save_counter.assign_add(1)  # as tf.train.CheckpointManager did: same format
        try:
            self._checkpoint.write(str(partial))
            _publish(partial, final)
        except (tf.errors.OpError, OSError) as exc:
            _remove_checkpoint(partial)
            raise as_os_error(exc, final) from None
        self._latest = str(final)
        self._damaged.discard(str(final))
        others = [path for path in checkpoint_paths(self.directory)  # newest first
                  if path != str(final) and path not in self._damaged and os.path.exists(path + ".index")]
        kept = sorted([*others[:self.keep - 1], str(final)], key=_order)
        _write_state(self.directory, kept)
        self._clean(kept)
        return str(final)

    def restore(self, path: str | Path | None = None) -> str | None:
        """Restore `path`, or else the newest intact checkpoint in the directory; returns its path or None.

        Damaged checkpoints newer than the one restored are named in a warning (and deleted by the next
        save). CheckpointError when `path` is damaged, when every checkpoint in the directory is, or when
        the checkpoint lacks variables of these trackables or holds them in other shapes.
        """
        if path is not None:
            path = str(path)
            reason = verify(path)
            if reason:
                raise DamagedCheckpoint(f"checkpoint {path} cannot be read: {reason}")
        else:
            path, skipped = newest_intact(self.directory)
            if skipped and path is None:
                raise DamagedCheckpoint(f"no checkpoint in {self.directory} can be read ({_describe(skipped)}); "
                                      "move the folder away to train from scratch")
            if skipped:
                warnings.warn(f"skipped damaged checkpoint{'s' if len(skipped) > 1 else ''} {_describe(skipped)}; "
                              f"resuming from {Path(path).name} instead", RuntimeWarning, stacklevel=2)
                self._damaged.update(path for path, _ in skipped)
            if path is None:
                return None
        try:
            self._checkpoint.restore(path).assert_existing_objects_matched()
        except (AssertionError, ValueError) as exc:  # variables missing, or of other shapes
            import tensorflow as tf

            tf.get_logger().setLevel("ERROR")  # its warnings about the half-done restore would bury the error
            first = str(exc).strip().splitlines()[0][:300]
            raise CheckpointError(f"cannot resume: the checkpoints in {self.directory} hold a different agent than "
                                  f"this config builds ({first}); resume with the config the run was made with, "
                                  "or use a new --logdir") from None
        self._latest = path
        return path

    def _clean(self, kept: list[str]) -> None:
        """Delete checkpoints not kept and what interrupted saves left; never fails a save over it."""
        keep = {Path(path).name for path in kept}
        for entry in list(self.directory.iterdir()):
            name = entry.name
            match = re.match(rf"^({PREFIX}-\d+)(\.index|\.data-\d+-of-\d+)$", name)
            leftover = (name.endswith("_temp") or SAVING_SUFFIX in name or name.startswith(f"{STATE_FILE}.tmp"))
            try:
                if entry.is_dir() and leftover:
                    shutil.rmtree(entry)
                elif leftover or (match and match.group(1) not in keep):
                    entry.unlink()
            except OSError:
                pass
        self._damaged.clear()


def checkpoint_paths(directory: str | Path) -> list[str]:
    """Path prefixes of the checkpoints in `directory`, newest first.

    Every ckpt-<n>.index counts, by n, whatever the `checkpoint` index says; checkpoints the index names
    are added even without files (so a restore can name them as missing).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    paths = {str(directory / entry.name[:-len(".index")]) for entry in directory.iterdir()
             if _CHECKPOINT_RE.match(entry.name)}
    named = _read_state(directory)
    paths.update(named)
    numbered = sorted((path for path in paths if _number(path) is not None), key=_number, reverse=True)
    return numbered + [path for path in named if _number(path) is None]


def has_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` holds any checkpoint files (cheap: does not read them)."""
    return bool(checkpoint_paths(directory))


def verify(path: str | Path) -> str | None:
    """Why the checkpoint at path prefix `path` cannot be restored, or None when it reads back completely.

    Reading every tensor checks the checksums: a truncated or overwritten data file fails here
    without touching any variable.
    """
    path = str(path)
    if not os.path.exists(path + ".index"):
        return "its .index file is missing"
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as exc:  # noqa: BLE001 - TF raises OpError, IndexError, ... for damaged files
        return _reason(exc)
    return None


def newest_intact(directory: str | Path) -> tuple[str | None, list[tuple[str, str]]]:
    """(newest checkpoint in `directory` that reads back completely or None, [(newer damaged one, why)])."""
    skipped = []
    for path in checkpoint_paths(directory):
        reason = verify(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def weights_source(path: str | Path) -> Path | None:
    """The checkpoint directory `restore_weights` reads for `path`, or None for a checkpoint file prefix.

    Cheap (no TensorFlow, no reading of the files), so a run can refuse a wrong --from_checkpoint before
    it builds anything: FileNotFoundError when `path` holds no checkpoint at all.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        if not Path(str(path) + ".index").exists():
            raise FileNotFoundError(f"no checkpoint at {path} (expected {path}.index)")
        return None
    directory = path if has_checkpoint(path) or not (path / "checkpoints").is_dir() else path / "checkpoints"
    if not has_checkpoint(directory):
        raise FileNotFoundError(f"no checkpoint found in {path}")
    return directory


def restore_weights(path: str | Path, agent: tf.Module) -> str:
    """Load the agent's network weights from a checkpoint file prefix or a checkpoint directory.

    Optimizer state (learning rates, Adam moments, loss scales) and update counters are left as
    built from the new config, so a run started from saved weights trains with its own settings.
    From a directory (a run's logdir or its checkpoints/) the newest intact checkpoint is used, with a
    warning naming any newer damaged one; a damaged file prefix is refused with CheckpointError.
    """
    import tensorflow as tf

    path = Path(path).expanduser()
    directory = weights_source(path)
    if directory is not None:
        latest, skipped = newest_intact(directory)
        if not latest:
            raise DamagedCheckpoint(f"no checkpoint in {directory} can be read ({_describe(skipped)})")
        if skipped:
            warnings.warn(f"skipped damaged checkpoint{'s' if len(skipped) > 1 else ''} {_describe(skipped)}; "
                          f"using {Path(latest).name}", RuntimeWarning, stacklevel=2)
        path = Path(latest)
    else:
        reason = verify(path)
        if reason:
            raise DamagedCheckpoint(f"checkpoint {path} cannot be read: {reason}")
    try:
        tf.train.Checkpoint(agent=_networks(agent)).restore(str(path)).expect_partial() \
            .assert_existing_objects_matched()
    except (AssertionError, ValueError) as exc:  # missing layers, or variables of other shapes
        # The run ends with this error; TF's warnings about the half-done restore would bury it.
        tf.get_logger().setLevel("ERROR")
        first = str(exc).strip().splitlines()[0][:300]
        raise CheckpointError(f"checkpoint {path} does not hold the weights of this agent "
                              f"(written for another architecture?): {first}") from None
    return str(path)


def as_os_error(exc: BaseException, path: str | Path) -> BaseException:
    """An OSError with errno and filename for a TensorFlow file error that names an OS cause (disk full,
    read-only, ...); other errors are returned unchanged."""
    if isinstance(exc, OSError):
        if exc.filename is None and exc.errno is not None:
            return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))
        return exc
    message = str(getattr(exc, "message", exc))
    for number in _OS_ERRORS:
        if os.strerror(number).lower() in message.lower():
            return OSError(number, os.strerror(number), str(path))
    return exc


def _networks(module: tf.Module) -> tf.train.Checkpoint:
    """A view of `module` under the same checkpoint names that holds its Keras layers only.

    Optimizers and bare variables (counters) are left out, so restoring through it skips them.
    """
    import keras
    import tensorflow as tf

    from dreamerv2_tf.algo.optim import Optimizer

    children = {}
    for name, value in vars(module).items():
        if isinstance(value, keras.layers.Layer) or (
                isinstance(value, dict) and value and all(isinstance(v, keras.layers.Layer) for v in value.values())):
            children[name] = value
        elif isinstance(value, tf.Module) and not isinstance(value, Optimizer):
            children[name] = _networks(value)
    return tf.train.Checkpoint(**children)


def _publish(partial: Path, final: Path) -> None:
    """Rename a completely written checkpoint to its final name: the data files first, the .index last,
    since a checkpoint counts as present once its .index is. An older checkpoint of the same step is made
    invisible (its .index removed) before its data files are replaced."""
    Path(str(final) + ".index").unlink(missing_ok=True)
    shards = sorted(partial.parent.glob(partial.name + ".data-*"))
    names = {shard.name[len(partial.name):] for shard in shards}
    for old in final.parent.glob(final.name + ".data-*"):
        if old.name[len(final.name):] not in names:
            old.unlink()
    for shard in shards:
        os.replace(shard, str(final) + shard.name[len(partial.name):])
    os.replace(str(partial) + ".index", str(final) + ".index")


def _remove_checkpoint(prefix: Path) -> None:
    for entry in prefix.parent.glob(prefix.name + "*"):
        try:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        except OSError:
            pass


def _write_state(directory: Path, kept: list[str]) -> None:
    """TensorFlow's `checkpoint` index (text proto, relative paths), replaced atomically."""
    names = [Path(path).name for path in kept]
    lines = [f'model_checkpoint_path: "{names[-1]}"'] + [f'all_model_checkpoint_paths: "{name}"' for name in names]
    temp = directory / f"{STATE_FILE}.tmp{os.getpid()}"
    try:
        temp.write_text("\n".join(lines) + "\n")
        os.replace(temp, directory / STATE_FILE)
    except OSError:
        temp.unlink(missing_ok=True)
        raise


def _read_state(directory: Path) -> list[str]:
    """Checkpoint prefixes the `checkpoint` index names (absolute), the latest first; [] if unreadable."""
    try:
        text = (directory / STATE_FILE).read_text(errors="replace")
    except OSError:
        return []
    paths = []
    for line in text.splitlines():
        match = _STATE_RE.match(line)
        if match and match.group(1):
            path = str(directory / match.group(1)) if not os.path.isabs(match.group(1)) else match.group(1)
            if path not in paths:
                paths.append(path)
    return paths


def _number(path: str) -> int | None:
    match = re.match(rf"^{PREFIX}-(\d+)$", Path(path).name)
    return int(match.group(1)) if match else None


def _order(path: str) -> tuple[bool, int]:
    """Sort key: numbered checkpoints by step, after any others."""
    number = _number(path)
    return number is not None, number or 0


def _describe(skipped: list[tuple[str, str]]) -> str:
    return ", ".join(f"{Path(path).name} ({reason})" for path, reason in skipped)


def _reason(exc: BaseException) -> str:
    """A short cause for a checkpoint that failed to read."""
    message = str(getattr(exc, "message", None) or exc).strip()
    lowered = message.lower()
    if "read less bytes" in lowered or "truncated" in lowered:
        return "data file truncated"
    if "checksum does not match" in lowered:
        return "data file corrupt (checksum mismatch)"
    if "sstable" in lowered:
        return "index file corrupt or truncated"
    if "no such file" in lowered or "not found" in lowered:
        return "data file missing"
    return (message.splitlines() or [type(exc).__name__])[0][:200]
