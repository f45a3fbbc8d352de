"""Checkpoints of the agent (weights, optimizer slots, loss scales, slow critic, counters, RNG)."""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

from dreamerv2_tf.optim import Optimizer


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


def restore_weights(path: str | Path, agent: tf.Module) -> str:
    """Load the agent's network weights from a checkpoint file prefix or a checkpoint directory.

    Optimizer state (learning rates, Adam moments, loss scales) and update counters are left as
    built from the new config, so a run started from saved weights trains with its own settings.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        latest = tf.train.latest_checkpoint(str(path)) or tf.train.latest_checkpoint(str(path / "checkpoints"))
        if not latest:
            raise FileNotFoundError(f"no checkpoint found in {path}")
        path = Path(latest)
    elif not Path(str(path) + ".index").exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {path}.index)")
    try:
        tf.train.Checkpoint(agent=_networks(agent)).restore(str(path)).expect_partial() \
            .assert_existing_objects_matched()
    except (AssertionError, ValueError) as exc:  # missing layers, or variables of other shapes
        # The run ends with this error; TF's warnings about the half-done restore would bury it.
        tf.get_logger().setLevel("ERROR")
        first = str(exc).strip().splitlines()[0][:300]
        raise ValueError(f"checkpoint {path} does not hold the weights of this agent "
                         f"(written for another architecture?): {first}") from None
    return str(path)


def _networks(module: tf.Module) -> tf.train.Checkpoint:
    """A view of `module` under the same checkpoint names that holds its Keras layers only.

    Optimizers and bare variables (counters) are left out, so restoring through it skips them.
    """
    children = {}
    for name, value in vars(module).items():
        if isinstance(value, keras.layers.Layer) or (
                isinstance(value, dict) and value and all(isinstance(v, keras.layers.Layer) for v in value.values())):
            children[name] = value
        elif isinstance(value, tf.Module) and not isinstance(value, Optimizer):
            children[name] = _networks(value)
    return tf.train.Checkpoint(**children)
