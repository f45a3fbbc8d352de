"""Checkpoints of the agent (weights, optimizer slots, loss scales, slow critic, counters, RNG)."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf


class Checkpointer:
    """Keeps the newest `keep` checkpoints in `directory`.

    tf.train.CheckpointManager writes each checkpoint under a new name and only
    then updates its index file, so an interrupted save never corrupts the last
    good checkpoint.
    """

    def __init__(self, directory: str | Path, keep: int, **trackables):
        self.directory = Path(directory)
        self._checkpoint = tf.train.Checkpoint(rng=tf.random.get_global_generator(), **trackables)
        self._manager = tf.train.CheckpointManager(self._checkpoint, str(self.directory), max_to_keep=max(1, keep))

    @property
    def latest(self) -> str | None:
        return self._manager.latest_checkpoint

    def save(self, step: int) -> str:
        return self._manager.save(checkpoint_number=step)

    def restore(self, path: str | None = None) -> str | None:
        """Restore `path` or the latest checkpoint; returns the path restored from, or None."""
        path = path or self.latest
        if path:
            try:
                self._checkpoint.restore(path).assert_existing_objects_matched()
            except AssertionError as exc:
                first = str(exc).strip().splitlines()[0][:300]
                raise ValueError(f"checkpoint {path} does not hold every variable of this agent (written by an "
                                 f"older version or for another architecture): {first}") from None
        return path


def restore_weights(path: str | Path, agent) -> str:
    """Load only the agent's weights from a checkpoint file prefix or a checkpoint directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        latest = tf.train.latest_checkpoint(str(path)) or tf.train.latest_checkpoint(str(path / "checkpoints"))
        if not latest:
            raise FileNotFoundError(f"no checkpoint found in {path}")
        path = Path(latest)
    elif not Path(str(path) + ".index").exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {path}.index)")
    tf.train.Checkpoint(agent=agent).restore(str(path)).expect_partial()
    return str(path)
