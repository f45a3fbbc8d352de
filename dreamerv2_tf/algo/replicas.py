"""The train step on the replicas of a tf.distribute strategy: a global batch split over the replicas,
the step run on each, gradients and metrics reduced. The strategies themselves, the input pipeline and
the cluster of workers are the training loop's (`loop/distribute.py`).

One update on N replicas. `dataset.batch` is the global batch: every replica trains on batch / N
sequences and computes its mean losses and their gradients. `Optimizer.minimize` then all-reduces the
gradients as the sum of the per-replica gradients divided by N, which is the gradient of the mean loss
over the global batch (every replica holds the same number of sequences). Everything after that sees
the same reduced gradients on every replica: global-norm clipping, the grad-norm metric, the
finiteness check of loss scaling, Adam and weight decay. (Keras 3's TF optimizer would clip each
replica's gradients before summing them, and the loss-scale optimizer would test finiteness per
replica; the reduction is therefore done before the optimizer, which is told not to reduce again.)
Metrics are means over replicas.

Loss terms that are not plain means over the batch are computed per replica: free nats
(`kl.free`) clip each replica's mean KL, as in any data-parallel implementation.

State updated inside the step stays identical on every replica: the update counters have
ONLY_FIRST_REPLICA aggregation (they add constants), while the skipped-update counters and the slow
critic are updated by each replica on its own copy from values that are the same on every replica
(they follow from the reduced gradients and from critic weights changed only by them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf


def is_distributed(strategy: tf.distribute.Strategy | None) -> bool:
    """False for the default (no-op) strategy, whose steps run as plain tf.functions."""
    if strategy is None:
        return False
    with strategy.scope():
        return tf.distribute.has_strategy()


def per_replica_batch(strategy: tf.distribute.Strategy, global_batch: int) -> int:
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise ValueError(f"dataset.batch ({global_batch}) must be divisible by the number of replicas "
                         f"({replicas}), because the global batch is split evenly across them; "
                         f"use a multiple of {replicas}")
    return global_batch // replicas


# ---- the batch ------------------------------------------------------------------------------


def _has_distributed_values(data: Any) -> bool:
    return any(isinstance(leaf, tf.distribute.DistributedValues) for leaf in tf.nest.flatten(data))


def split_batch(strategy: tf.distribute.Strategy | None, data: Mapping[str, Any]):
    """A global batch [B, ...] split into B / replicas per replica (in replica order).

    Data that is already distributed (from `loop.distribute.distribute_dataset`) and data under the default strategy
    pass through unchanged.
    """
    if not is_distributed(strategy) or _has_distributed_values(data):
        return data
    data = {key: tf.convert_to_tensor(value) for key, value in data.items()}
    batch = int(next(iter(data.values())).shape[0])
    size = per_replica_batch(strategy, batch)

    def value_fn(context: tf.distribute.ValueContext):
        start = context.replica_id_in_sync_group * size
        return {key: value[start:start + size] for key, value in data.items()}

    return strategy.experimental_distribute_values_from_function(value_fn)


def first_replica(strategy: tf.distribute.Strategy | None, data: Any) -> Any:
    """The local first replica's part of distributed data (other data unchanged)."""
    if not is_distributed(strategy):
        return data

    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    return local(data) if isinstance(data, tf.distribute.DistributedValues) else tf.nest.map_structure(local, data)


# ---- inside the train step -------------------------------------------------------------------


def mean_over_replicas(values: Sequence[tf.Tensor | None]) -> list[tf.Tensor | None]:
    """All-reduce per-replica gradients to their mean: sum over replicas of value / replicas.

    With per-replica mean losses over equal shares of the global batch this is the gradient of the
    global mean loss. A no-op with one replica; None entries (unconnected variables) stay None.
    """
    values = list(values)
    context = tf.distribute.get_replica_context()
    if context is None:
        raise RuntimeError("gradients can only be reduced in a replica context: run the train step "
                           "through strategy.run (Agent.train does)")
    replicas = context.num_replicas_in_sync
    if replicas == 1:
        return values
    present = [i for i, value in enumerate(values) if value is not None]
    scaled = [_scale(values[i], 1.0 / replicas) for i in present]
    reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, scaled)
    for i, value in zip(present, reduced, strict=True):
        values[i] = value
    return values


def _scale(value, factor: float):
    if isinstance(value, tf.IndexedSlices):
        return tf.IndexedSlices(value.values * tf.cast(factor, value.values.dtype), value.indices,
                                value.dense_shape)
    return value * tf.cast(factor, value.dtype)


def replicated(fn: Callable[..., tuple[Mapping[str, tf.Tensor], Any]], strategy: tf.distribute.Strategy | None = None,
               jit: bool = False) -> Callable[..., tuple[dict[str, tf.Tensor], Any]]:
    """`fn`, returning (dict of scalar metrics, state), as a step that runs on every replica.

    Under the default strategy this is `tf.function(fn, jit_compile=jit)`. Otherwise each replica runs
    `fn` on its part of the (distributed) arguments; the metrics are averaged over replicas and the
    state stays per replica, to be passed back in. XLA compiles the replica function only when all
    replicas are GPUs: on other devices tf.distribute synchronises through merge calls, which a compiled
    replica function cannot contain.
    """
    strategy = strategy or tf.distribute.get_strategy()
    # The steps write their loops as tf.scan and branch on Python settings only, so AutoGraph's conversion
    # of their source (autograph=False skips it) would only add tracing time to every process.
    if not is_distributed(strategy):
        return tf.function(fn, jit_compile=jit, reduce_retracing=True, autograph=False)
    all_gpus = all("GPU" in device.upper() for device in strategy.extended.worker_devices)
    if jit and not all_gpus:
        warnings.warn("jit is ignored for the distributed train step on non-GPU devices "
                      "(XLA-compiled replica functions need all replicas on GPUs)", RuntimeWarning, stacklevel=2)
    replica_fn = tf.function(fn, jit_compile=True, autograph=False) if jit and all_gpus else fn

    def step(*args):
        with warnings.catch_warnings():
            # TFP notes that stateful seeds make replicated sampling irreproducible; replicas are meant to
            # draw different samples, and results already depend on the number of replicas.
            warnings.filterwarnings("ignore", message="Using stateful random seeds in replicated context")
            metrics, state = strategy.run(replica_fn, args=args)
        return {key: strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
                for key, value in metrics.items()}, state

    return tf.function(step, reduce_retracing=True, autograph=False)


__all__ = ["is_distributed", "per_replica_batch", "split_batch", "first_replica", "mean_over_replicas", "replicated"]
