"""Data-parallel training with tf.distribute: one device, several local devices, or several hosts.

Strategies (config key `strategy`):

- `default`: no distribution; the train step is a plain (optionally XLA-compiled) tf.function.
- `mirrored`: tf.distribute.MirroredStrategy over this host's GPUs, or over its logical CPU devices
  when it has no GPU (tests split the CPU into two logical devices).
- `multi_worker`: tf.distribute.MultiWorkerMirroredStrategy. The cluster comes from the standard
  TF_CONFIG environment variable, so the same command runs on every host; without TF_CONFIG it is a
  single worker over the local devices.

The train step's side (splitting a batch over the replicas, running the step on each, reducing
gradients and metrics) is in `algo/replicas.py`.

Variables must be created under `strategy.scope()`: build the Agent inside it. Checkpoints of mirrored
variables hold one copy of each variable, so they restore under any strategy.

Multi-worker design. MultiWorkerMirroredStrategy needs every worker to run the same sequence of
collective operations, and every replica needs a batch at every update. Each worker is therefore a
complete training process:

- It steps its own environments and keeps its own replay. The chief (task `chief`, or `worker` 0 when
  the cluster has no chief) uses the logdir itself; worker k uses `<logdir>/worker<k>` and the seed
  `seed + 100000 * k`, so workers collect different experience and replicas draw different random
  numbers. Nothing is shared between hosts but the collective operations; no shared filesystem is
  needed. (Sending the chief's episodes to the other workers would need one, or a data service, and
  would make data collection a bottleneck that grows with the number of workers.)
- Each replica samples its part of the global batch from its own worker's replay, so every update
  mixes the experience of all workers. `steps` and `train_every` count each worker's agent steps: W
  workers collect W times as much data per update as one host would with the same settings.
- Every decision that leads to a collective operation is agreed on by all workers with a one-number
  all-reduce (`Cluster.agree`): whether to keep running, whether to update now and whether to save a
  checkpoint. Evaluation, logging, video reports and acting involve no collectives and stay local.
- Every worker saves checkpoints at the same updates into its own logdir (MultiWorkerMirroredStrategy
  expects all workers to take part in saving). When a run resumes, every worker restores its own
  checkpoint and then all variables are broadcast from the chief (`Cluster.broadcast`), so the workers
  can never continue from different weights.
- Only the chief writes metrics and TensorBoard logs (other workers' logs would look like extra runs
  to the score and plot scripts); the other workers print to their terminal and keep their episodes,
  config and checkpoints in their subfolder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from dreamerv2_tf.algo.replicas import is_distributed, per_replica_batch
from dreamerv2_tf.config import CHOICES

STRATEGIES = CHOICES["strategy"]
AGREE_MODES = ("all", "any", "chief")
SEED_STRIDE = 100_000  # worker k runs with seed + k * SEED_STRIDE


# ---- strategies and workers ------------------------------------------------------------------


def local_devices() -> list[str]:
    """This host's GPUs, or its logical CPU devices when it has none."""
    gpus = tf.config.list_logical_devices("GPU")
    return [device.name for device in (gpus or tf.config.list_logical_devices("CPU"))]


def make_strategy(name: str, devices: Sequence[str] | None = None) -> tf.distribute.Strategy:
    """The strategy named by the config key `strategy`.

    `multi_worker` must be created before TensorFlow starts its runtime (before any tensor op), so
    scripts create the strategy first.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got '{name}'")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(list(devices) if devices else local_devices())
    parse_tf_config(os.environ.get("TF_CONFIG"))  # a clear message for a malformed TF_CONFIG
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except (RuntimeError, ValueError) as exc:
        raise RuntimeError(f"cannot create the multi_worker strategy: {exc} (it must be created before any "
                           "other TensorFlow operation runs, and every host in TF_CONFIG must be reachable)") from None


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """This process's place in the cluster. `worker_id` 0 is the chief."""

    task_type: str = "worker"
    task_index: int = 0
    worker_id: int = 0
    num_workers: int = 1

    @property
    def is_chief(self) -> bool:
        return self.worker_id == 0


def parse_tf_config(text: str | None) -> WorkerInfo:
    """Read a TF_CONFIG JSON string; empty or missing means a single worker.

    Example: {"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 1}}
    """
    if not text or not text.strip():
        return WorkerInfo()
    example = ('e.g. {"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
               '"task": {"type": "worker", "index": 0}}')
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"TF_CONFIG is not valid JSON ({exc}); {example}") from None
    cluster = spec.get("cluster") if isinstance(spec, dict) else None
    task = spec.get("task") if isinstance(spec, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ValueError(f"TF_CONFIG needs a 'cluster' and a 'task' mapping; {example}")
    unsupported = sorted(set(cluster) - {"chief", "worker"})
    if unsupported:
        raise ValueError(f"TF_CONFIG cluster has task types {', '.join(unsupported)}, which the multi_worker "
                         "strategy does not use; valid task types: chief, worker")
    for kind, hosts in cluster.items():
        if not isinstance(hosts, list) or not all(isinstance(host, str) for host in hosts):
            raise ValueError(f"TF_CONFIG cluster '{kind}' must be a list of 'host:port' strings, got {hosts!r}")
    if len(cluster.get("chief", [])) > 1:
        raise ValueError(f"TF_CONFIG cluster may have at most one chief, got {len(cluster['chief'])}")
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in ("chief", "worker"):
        raise ValueError(f"TF_CONFIG task type must be one of chief, worker, got {kind!r}")
    hosts = cluster.get(kind, [])
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(hosts):
        raise ValueError(f"TF_CONFIG task index must be an integer in [0, {len(hosts)}) for the {len(hosts)} "
                         f"'{kind}' host(s) of the cluster, got {index!r}")
    order = [("chief", i) for i in range(len(cluster.get("chief", [])))]
    order += [("worker", i) for i in range(len(cluster.get("worker", [])))]
    return WorkerInfo(kind, index, order.index((kind, index)), len(order))


def worker_info(strategy: tf.distribute.Strategy) -> WorkerInfo:
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return parse_tf_config(os.environ.get("TF_CONFIG"))
    return WorkerInfo()



# ---- inputs ----------------------------------------------------------------------------------


def distribute_dataset(strategy: tf.distribute.Strategy, make_dataset: Callable[[int], tf.data.Dataset],
                       global_batch: int):
    """The training input: `make_dataset(batch)` must return an endless dataset of batches.

    Without distribution this is `make_dataset(global_batch)`. Otherwise every worker builds one
    dataset of per-replica batches (`global_batch / replicas`) from its own replay, and its
    replicas take consecutive batches, prefetched to their devices.
    """
    per_replica_batch(strategy, global_batch)
    if not is_distributed(strategy):
        return make_dataset(global_batch)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        dataset = make_dataset(context.get_per_replica_batch_size(global_batch))
        if tf.get_static_value(dataset.cardinality()) == tf.data.UNKNOWN_CARDINALITY:
            # Replay streams are endless generators. Saying so keeps tf.distribute from checking on
            # every `next` whether all workers still have data, a collective operation that would
            # hang when only the chief draws a batch (e.g. for a video report).
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
        return dataset

    return strategy.distribute_datasets_from_function(dataset_fn)



# ---- variables -------------------------------------------------------------------------------


def _tf_variable(variable):
    """The tf.Variable (mirrored under a strategy) behind a Keras variable."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def trackable_variables(root: Any) -> list[tf.Variable]:
    """Every variable a checkpoint of `root` holds: weights, optimizer slots, loss scales, counters."""
    found, seen = [], set()
    for obj in tf.train.TrackableView(root).descendants():
        variable = _tf_variable(obj) if isinstance(obj, keras.Variable) else obj
        if isinstance(variable, tf.Variable) and id(variable) not in seen:
            seen.add(id(variable))
            found.append(variable)
    return found


def local_copies(variable) -> list[tf.Tensor]:
    """The values of a (mirrored) variable on each local replica; one value without distribution."""
    variable = _tf_variable(variable)
    strategy = getattr(variable, "distribute_strategy", None) or tf.distribute.get_strategy()
    return [tf.convert_to_tensor(value) for value in strategy.experimental_local_results(variable)]


def broadcast_from_chief(strategy: tf.distribute.Strategy, variables: Sequence[tf.Variable]) -> None:
    """Give every replica on every worker the first replica's (the chief's) values."""
    variables = [_tf_variable(variable) for variable in variables]
    if not variables or strategy.num_replicas_in_sync == 1:
        return

    groups: dict[tf.DType, list[tf.Variable]] = {}
    for variable in variables:  # all-reduce packs its tensors together, which needs one dtype
        groups.setdefault(variable.dtype.base_dtype, []).append(variable)

    def replica_fn():
        context = tf.distribute.get_replica_context()
        first = tf.equal(context.replica_id_in_sync_group, 0)
        for group in groups.values():
            values = [tf.where(first, variable.read_value(), tf.zeros_like(variable)) for variable in group]
            for variable, value in zip(group, context.all_reduce(tf.distribute.ReduceOp.SUM, values), strict=True):
                variable.assign(value)

    tf.function(lambda: strategy.run(replica_fn))()


# ---- the cluster, for the training loop ------------------------------------------------------


class Cluster:
    """A strategy plus this process's place among the workers, with the helpers the loop needs."""

    def __init__(self, strategy: str | tf.distribute.Strategy = "default", worker: WorkerInfo | None = None):
        self.strategy = make_strategy(strategy) if isinstance(strategy, str) else strategy
        self.worker = worker or worker_info(self.strategy)
        self._vote = None

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def num_workers(self) -> int:
        return self.worker.num_workers

    @property
    def is_chief(self) -> bool:
        return self.worker.is_chief

    def scope(self):
        """Build the agent (and so create its variables) inside this scope."""
        return self.strategy.scope()

    def worker_logdir(self, logdir: str | Path) -> Path:
        """The chief's logdir is `logdir`; worker k writes to `logdir/worker<k>`."""
        logdir = Path(logdir)
        return logdir if self.is_chief else logdir / f"worker{self.worker.worker_id}"

    def worker_seed(self, seed: int) -> int:
        return int(seed) + SEED_STRIDE * self.worker.worker_id

    def dataset(self, make_dataset: Callable[[int], tf.data.Dataset], global_batch: int):
        return distribute_dataset(self.strategy, make_dataset, global_batch)

    def agree(self, flag: bool, require: str = "all") -> bool:
        """One answer for all workers: True if every worker (`all`), some worker (`any`) or the chief
        (`chief`) passes True.

        A one-number all-reduce across workers; on a single worker it returns `flag` and costs nothing.
        Every worker must call it at the same points of the loop.
        """
        if require not in AGREE_MODES:
            raise ValueError(f"require must be one of {', '.join(AGREE_MODES)}, got '{require}'")
        if self.num_workers == 1:
            return bool(flag)
        if self._vote is None:
            strategy = self.strategy

            @tf.function
            def vote(value):
                votes = strategy.run(lambda v: tf.cast(v, tf.int32), args=(value,))
                return strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)

            self._vote = vote
        vote = bool(flag) and (require != "chief" or self.is_chief)
        yes = int(self._vote(tf.constant(vote)))  # replicas whose worker voted yes
        return yes == self.num_replicas if require == "all" else yes > 0

    def broadcast(self, root: Any) -> None:
        """After restoring checkpoints: every worker continues from the chief's variables."""
        if self.num_workers > 1:
            broadcast_from_chief(self.strategy, trackable_variables(root))


__all__ = [
    "STRATEGIES", "Cluster", "WorkerInfo", "make_strategy", "parse_tf_config", "worker_info", "distribute_dataset",
    "trackable_variables", "local_copies", "broadcast_from_chief", "local_devices",
]
