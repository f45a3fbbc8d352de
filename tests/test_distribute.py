"""Multi-device training: strategy choice, TF_CONFIG parsing, and data-parallel updates that match one device.

The mirrored checks split the host CPU into two logical devices, which must happen before TensorFlow
starts its runtime, so they run in a fresh Python process: this file run as a script
(`python tests/test_distribute.py <scenario> <result.json>`), which writes its measurements as JSON
for the tests below to check.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from dreamerv2_tf.algo import replicas
from dreamerv2_tf.loop import distribute

HERE = Path(__file__).resolve().parent
# Clipping thresholds well below the gradient norms of the tiny agent: clipping must act on the
# all-reduced gradients (clipping each replica's share first would give other updates).
EQUIVALENCE = {"model_opt.clip": 1.0, "actor_opt.clip": 0.02, "critic_opt.clip": 0.1, "slow_target_update": 2,
               "actor_grad": "both", "actor_grad_mix": 0.5}
TRAIN_STEPS = 3


# ---- without devices: configuration and errors ----------------------------------------------


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="strategy must be one of default, mirrored, multi_worker, got 'tpu'"):
        distribute.make_strategy("tpu")


def test_default_strategy_is_a_plain_single_worker():
    cluster = distribute.Cluster("default")
    assert not replicas.is_distributed(cluster.strategy)
    assert (cluster.num_replicas, cluster.num_workers, cluster.is_chief) == (1, 1, True)
    assert cluster.worker_logdir("runs/x") == Path("runs/x")
    assert cluster.worker_seed(7) == 7
    assert cluster.agree(True) and not cluster.agree(False) and cluster.agree(True, "any")
    assert cluster.agree(True, "chief") and not cluster.agree(False, "chief")
    with pytest.raises(ValueError, match="require must be one of all, any, chief, got 'most'"):
        cluster.agree(True, "most")
    calls = []
    assert cluster.dataset(lambda batch: calls.append(batch) or "data", 16) == "data"
    assert calls == [16]  # the global batch, unsplit


def test_tf_config_gives_worker_ids_chief_first():
    assert distribute.parse_tf_config(None) == distribute.WorkerInfo()
    workers = {"cluster": {"worker": ["a:1", "b:1", "c:1"]}, "task": {"type": "worker", "index": 2}}
    info = distribute.parse_tf_config(json.dumps(workers))
    assert (info.worker_id, info.num_workers, info.is_chief) == (2, 3, False)
    with_chief = {"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {"type": "worker", "index": 0}}
    info = distribute.parse_tf_config(json.dumps(with_chief))
    assert (info.worker_id, info.num_workers, info.is_chief) == (1, 3, False)
    chief = distribute.parse_tf_config(json.dumps({**with_chief, "task": {"type": "chief", "index": 0}}))
    assert chief.is_chief and chief.worker_id == 0


def test_non_chief_workers_get_their_own_logdir_and_seed():
    info = distribute.WorkerInfo("worker", 2, 2, 3)
    cluster = distribute.Cluster("default", worker=info)
    assert cluster.worker_logdir("runs/pong") == Path("runs/pong/worker2")
    assert cluster.worker_seed(3) == 3 + 2 * distribute.SEED_STRIDE
    chief = distribute.Cluster("default", worker=distribute.WorkerInfo("worker", 0, 0, 3))
    assert chief.worker_logdir("runs/pong") == Path("runs/pong") and chief.worker_seed(3) == 3


@pytest.mark.parametrize("text, message", [
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('{"task": {"type": "worker", "index": 0}}', "TF_CONFIG needs a 'cluster' and a 'task' mapping"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:1"]}, "task": {"type": "worker", "index": 0}}',
     "task types ps, which the multi_worker strategy does not use; valid task types: chief, worker"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}',
     r"task index must be an integer in \[0, 2\)"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator", "index": 0}}',
     "task type must be one of chief, worker, got 'evaluator'"),
    ('{"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}', "must be a list of 'host:port'"),
])
def test_malformed_tf_config_gives_a_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        distribute.parse_tf_config(text)


def test_global_batch_must_split_evenly_across_replicas():
    three = SimpleNamespace(num_replicas_in_sync=3)
    assert replicas.per_replica_batch(three, 12) == 4
    with pytest.raises(ValueError, match=r"dataset.batch \(16\) must be divisible by the number of replicas \(3\)"):
        replicas.per_replica_batch(three, 16)


def test_gradient_reduction_is_a_no_op_on_one_device():
    grads = [tf.constant([1.0, 2.0]), None]
    reduced = replicas.mean_over_replicas(grads)
    assert reduced[1] is None and reduced[0] is grads[0]


# ---- two logical CPU devices, in a fresh process ---------------------------------------------


def run_child(scenario: str, timeout: float = 300) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        environ = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), scenario, str(out)],
                              env=environ, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            raise AssertionError(f"{scenario} child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


@pytest.fixture(scope="module")
def mirrored():
    return run_child("mirrored")


def test_mirrored_strategy_uses_both_logical_devices(mirrored):
    assert mirrored["replicas"] == 2
    assert [device.rsplit(":", 2)[-2:] for device in mirrored["devices"]] == [["CPU", "0"], ["CPU", "1"]]


def test_mirrored_update_matches_single_device_on_the_same_global_batch(mirrored):
    steps = mirrored["equivalence"]["metrics"]
    assert len(steps) == TRAIN_STEPS
    keys = ("model_loss", "image_loss", "vector_loss", "reward_loss", "discount_loss", "kl_loss", "actor_loss",
            "critic_loss", "critic_target", "actor_ent", "model_grad_norm", "actor_grad_norm", "critic_grad_norm")
    for index, metrics in enumerate(steps):
        for key in keys:
            single, mirror = metrics[key]
            np.testing.assert_allclose(mirror, single, rtol=2e-5, atol=1e-6, err_msg=f"step {index}: {key}")
    first = steps[0]
    # Clipping was active, so the test would catch clipping per replica before the reduction.
    assert first["model_grad_norm"][0] > 3 * EQUIVALENCE["model_opt.clip"]
    assert first["actor_grad_norm"][0] > 3 * EQUIVALENCE["actor_opt.clip"]
    assert first["critic_grad_norm"][0] > 3 * EQUIVALENCE["critic_opt.clip"]


def test_mirrored_weights_after_updates_match_single_device(mirrored):
    result = mirrored["equivalence"]
    assert result["variables"] > 100  # weights, Adam slots, slow critic, counters
    moved = [update for _, update in result["weights"] if update > 0]
    assert len(moved) > 20  # the updates changed the weights ...
    for name, (diff, update) in zip(result["names"], result["weights"], strict=True):
        # ... and both runs changed them alike.
        assert diff <= 1e-6 + 2e-3 * update, f"{name}: differs by {diff}, moved by {update}"


def test_mirrored_replicas_stay_identical_and_count_each_update_once(mirrored):
    result = mirrored["equivalence"]
    assert result["max_copy_diff"] == 0.0  # every variable holds the same value on both devices
    assert result["counters"] == {"step": TRAIN_STEPS, "ac_updates": TRAIN_STEPS, "model_iterations": TRAIN_STEPS}
    # The slow critic was refreshed (every 2 updates) from the critic on both devices alike.
    assert result["slow_critic_moved"] > 0


def test_mirrored_video_report_uses_the_first_replica_share(mirrored):
    result = mirrored["equivalence"]
    assert result["report_shape"] == [2, 6, 3 * 64, 64, 1]  # truth | model | error of 2 sequences
    assert result["report_truth_matches"]


def test_replicas_draw_different_random_samples(mirrored):
    assert not mirrored["sampling"]["identical"]


def test_global_batch_not_divisible_by_replicas_is_refused(mirrored):
    message = mirrored["equivalence"]["odd_batch"]
    assert "dataset.batch (3) must be divisible by the number of replicas (2)" in message


def test_mirrored_training_end_to_end_with_replay_driver_and_checkpoint(mirrored):
    result = mirrored["end_to_end"]
    # The replay dataset yields per-replica batches: the global batch of 4 sequences split in two.
    assert result["per_replica_shapes"] == [[2, 10], [2, 10]]
    assert result["updates"] == 3 and result["policy_steps"] >= 20
    for metrics in result["metrics"]:
        assert all(np.isfinite(value) for value in metrics.values()), metrics
    # A checkpoint written under the strategy restores into a single-device agent.
    assert result["restored_step"] == 3
    assert result["restored_max_diff"] == 0.0 and result["restored_variables"] > 100


@pytest.mark.slow
def test_mirrored_mixed_float16_update_matches_single_device():
    result = run_child("mixed16")
    for key, (single, mirror) in result["compare"].items():
        np.testing.assert_allclose(mirror, single, rtol=1e-3, atol=1e-5, err_msg=key)
    assert all(np.isfinite(value) for value in result["metrics"].values()), result["metrics"]
    # Overflowing gradients: the update is skipped on both replicas and the scale halves on both.
    assert result["overflow_skipped"] == 1.0 and result["overflow_unchanged"]
    np.testing.assert_allclose(result["scale_after_overflow"], [1.5e38, 1.5e38], rtol=1e-6)
    assert result["max_copy_diff"] == 0.0


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("localhost", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.mark.slow
def test_two_workers_train_in_lock_step_from_different_data():
    ports = free_ports(2)
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    with tempfile.TemporaryDirectory() as tmp:
        procs, outs = [], []
        for index in range(2):
            out = Path(tmp) / f"worker{index}.json"
            config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            environ = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": config}
            procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "multi_worker", str(out)],
                                          env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            outs.append(out)
        try:
            errors = [proc.communicate(timeout=300)[1] for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        for proc, err in zip(procs, errors, strict=True):
            assert proc.returncode == 0, err[-4000:]
        chief, other = (json.loads(out.read_text()) for out in outs)
    assert (chief["num_workers"], chief["is_chief"], other["is_chief"]) == (2, True, False)
    assert chief["replicas"] == other["replicas"] == 2
    # The workers fed different data, yet hold the same weights after every update ...
    assert chief["data_checksum"] != other["data_checksum"]
    assert chief["weights_checksums"] == pytest.approx(other["weights_checksums"], rel=0, abs=0)
    assert chief["metrics"] == pytest.approx(other["metrics"], rel=1e-6)
    # ... agree on decisions, and take the chief's weights after a broadcast.
    assert chief["agree"] == other["agree"] == {"all_mixed": False, "any_mixed": True, "all_true": True,
                                                "chief_no": False, "chief_yes": True}
    assert chief["after_broadcast"] == other["after_broadcast"] == chief["chief_value"]
    assert chief["broadcast_checksum"] == other["broadcast_checksum"]


# ---- the child process -----------------------------------------------------------------------


def _split_cpu(count: int) -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


@contextlib.contextmanager
def _samples_are_modes():
    """Categorical samples become their (straight-through) modes, so an update is deterministic and two
    runs on the same batch must agree up to rounding."""
    from dreamerv2_tf.algo import dists

    def mode_sample(self, sample_shape=(), seed=None, name="sample"):
        mode = self.mode()
        shape = tf.concat([tf.reshape(tf.cast(sample_shape, tf.int32), [-1]), tf.shape(mode)], 0)
        return tf.broadcast_to(mode, shape)

    original = dists.OneHotDist.sample
    dists.OneHotDist.sample = mode_sample
    try:
        yield
    finally:
        dists.OneHotDist.sample = original


def _values(agent) -> list[np.ndarray]:
    return [variable.numpy() for variable in distribute.trackable_variables(agent)]


def _max_copy_diff(agent) -> float:
    worst = 0.0
    for variable in distribute.trackable_variables(agent):
        copies = [copy.numpy() for copy in distribute.local_copies(variable)]
        worst = max([worst] + [float(np.max(np.abs(copy.astype(np.float64) - copies[0]))) for copy in copies[1:]])
    return worst


def _equivalence(strategy) -> dict:
    from helpers import discrete_actions, make_agent, obs_space, random_batch

    obs, act = obs_space((64, 64, 1), vector=5), discrete_actions(3)
    overrides = {**EQUIVALENCE, "encoder.cnn_depth": 2, "decoder.cnn_depth": 2}
    single = make_agent(obs, act, overrides, seed=5)
    with strategy.scope():
        mirror = make_agent(obs, act, overrides, seed=5)
    source, target = distribute.trackable_variables(single), distribute.trackable_variables(mirror)
    assert [(v.shape, v.dtype) for v in source] == [(v.shape, v.dtype) for v in target]
    for src, dst in zip(source, target, strict=True):
        dst.assign(src.read_value())
    before = _values(single)
    slow_before = [v.numpy() for v in mirror.ac.slow_critic.variables]
    metrics = []
    with _samples_are_modes():
        for index in range(TRAIN_STEPS):
            data = random_batch(obs, act, batch=4, length=6, seed=10 + index, firsts=(0, 3))
            first, second = single.train(data)[0], mirror.train(data)[0]
            metrics.append({key: [float(first[key]), float(second[key])] for key in first})
    try:
        mirror.train(random_batch(obs, act, batch=3, length=6))
        odd_batch = ""
    except ValueError as exc:
        odd_batch = str(exc)
    # The video report of distributed data uses the first replica's share of the batch.
    video = mirror.report(replicas.split_batch(strategy, data))["openl_image"].numpy()
    after, mirrored_after = _values(single), _values(mirror)
    weights = [[float(np.max(np.abs(m.astype(np.float64) - a))), float(np.max(np.abs(a.astype(np.float64) - b)))]
               for a, m, b in zip(after, mirrored_after, before, strict=True)]
    slow_moved = max(float(np.max(np.abs(v.numpy() - b))) for v, b in
                     zip(mirror.ac.slow_critic.variables, slow_before, strict=True))
    return {
        "metrics": metrics, "variables": len(source), "weights": weights,
        "names": [v.name for v in source], "max_copy_diff": _max_copy_diff(mirror),
        "counters": {"step": int(mirror.step.numpy()), "ac_updates": int(mirror.ac.updates.numpy()),
                     "model_iterations": int(mirror.wm.opt.opt.iterations.numpy())},
        "slow_critic_moved": slow_moved, "report_shape": list(video.shape), "odd_batch": odd_batch,
        "report_truth_matches": bool(np.allclose(video[:, :, :64], data["image"][:2] / 255.0, atol=1e-6)),
    }


def _replica_sampling(strategy) -> dict:
    import keras

    from dreamerv2_tf.algo import dists

    keras.utils.set_random_seed(0)

    def sample():
        return dists.onehot(tf.zeros([64, 8])).sample()

    @tf.function
    def draw():
        return strategy.run(sample)

    first, second = (value.numpy() for value in strategy.experimental_local_results(draw()))
    return {"identical": bool(np.array_equal(first, second))}


def _end_to_end(strategy, tmp: Path) -> dict:
    from helpers import tiny_config

    from dreamerv2_tf.algo.agent import Agent
    from dreamerv2_tf.envs import make_env
    from dreamerv2_tf.loop.checkpoint import Checkpointer
    from dreamerv2_tf.loop.driver import Driver, random_policy
    from dreamerv2_tf.loop.replay import Replay

    config = tiny_config({"task": "gym_CartPole-v1", "log_keys_video": []})
    cluster = distribute.Cluster(strategy)
    env = make_env(config.task, seed=0)
    replay = Replay(tmp / "train_episodes", 10**5, minlen=1, maxlen=config.dataset.length)
    driver = Driver([env], on_step=[replay.add_step])
    driver(random_policy(env.act_space, 1, 0), steps=60)
    with cluster.scope():
        agent = Agent(env.obs_space, env.act_space, config, "32")
    dataset = iter(cluster.dataset(lambda batch: replay.dataset(batch, config.dataset.length), config.dataset.batch))
    batch = next(dataset)
    shapes = [list(value.shape) for value in strategy.experimental_local_results(batch["reward"])]
    metrics = [{k: float(v) for k, v in agent.train(next(dataset))[0].items()} for _ in range(3)]
    policy_steps = driver(lambda obs, state: agent.policy(obs, state, "train"), steps=20)["steps"]
    agent.report(next(dataset))
    Checkpointer(tmp / "checkpoints", 1, agent=agent).save(1)
    single = Agent(env.obs_space, env.act_space, config, "32")
    Checkpointer(tmp / "checkpoints", 1, agent=single).restore()
    restored = [float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in
                zip(_values(agent), _values(single), strict=True)]
    return {"per_replica_shapes": shapes, "updates": int(agent.step.numpy()), "metrics": metrics,
            "policy_steps": policy_steps, "restored_step": int(single.step.numpy()),
            "restored_max_diff": max(restored), "restored_variables": len(restored)}


def _child_mirrored(out: Path) -> None:
    _split_cpu(2)
    strategy = distribute.make_strategy("mirrored")
    result = {"replicas": strategy.num_replicas_in_sync, "devices": list(strategy.extended.worker_devices)}
    result["equivalence"] = _equivalence(strategy)
    result["sampling"] = _replica_sampling(strategy)
    with tempfile.TemporaryDirectory() as tmp:
        result["end_to_end"] = _end_to_end(strategy, Path(tmp))
    out.write_text(json.dumps(result))


def _child_mixed16(out: Path) -> None:
    _split_cpu(2)
    from helpers import discrete_actions, make_agent, obs_space, random_batch

    strategy = distribute.make_strategy("mirrored")
    obs, act = obs_space(None, vector=5), discrete_actions(3)
    single = make_agent(obs, act, seed=2, prec="16")
    with strategy.scope():
        mirror = make_agent(obs, act, seed=2, prec="16")
    for src, dst in zip(distribute.trackable_variables(single), distribute.trackable_variables(mirror), strict=True):
        dst.assign(src.read_value())
    data = random_batch(obs, act, batch=4, length=6, seed=1)
    with _samples_are_modes():
        first, second = single.train(data)[0], mirror.train(data)[0]
        # A loss scale that overflows the gradients: every replica must skip the update alike.
        weights = [v.numpy() for v in mirror.wm.variables_to_train]
        mirror.wm.opt.opt.dynamic_scale.assign(3e38)
        overflow, _ = mirror.train(data)
    unchanged = all(np.array_equal(a, v.numpy()) for a, v in zip(weights, mirror.wm.variables_to_train, strict=True))
    keys = ("model_loss", "model_grad_norm", "actor_loss", "critic_loss", "model_loss_scale")
    out.write_text(json.dumps({
        "compare": {key: [float(first[key]), float(second[key])] for key in keys},
        "metrics": {k: float(v) for k, v in second.items()},
        "overflow_skipped": float(overflow["model_skipped_updates"]), "overflow_unchanged": unchanged,
        "scale_after_overflow": [float(copy) for copy in distribute.local_copies(mirror.wm.opt.opt.dynamic_scale)],
        "max_copy_diff": _max_copy_diff(mirror)}))


def _random_episode(rng: np.random.Generator, length: int = 12) -> dict[str, np.ndarray]:
    flags = np.zeros(length, bool)
    return {"vector": rng.normal(size=(length, 3)).astype(np.float32),
            "action": np.eye(2, dtype=np.float32)[rng.integers(0, 2, length)],
            "reward": rng.normal(size=length).astype(np.float32), "is_first": np.arange(length) == 0,
            "is_last": np.arange(length) == length - 1, "is_terminal": flags}


def _child_multi_worker(out: Path) -> None:
    """One of two workers (TF_CONFIG set by the test), each training from its own replay."""
    cluster = distribute.Cluster("multi_worker")  # before any other TensorFlow operation
    from helpers import discrete_actions, make_agent, obs_space

    from dreamerv2_tf.loop.replay import Replay

    obs, act = obs_space(None, vector=3), discrete_actions(2)
    with cluster.scope():
        agent = make_agent(obs, act)
    rng = np.random.default_rng(cluster.worker_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        replay = Replay(cluster.worker_logdir(tmp) / "train_episodes", seed=cluster.worker_seed(0))
        for _ in range(3):
            replay.add_episode(_random_episode(rng))
        data_checksum = float(sum(np.sum(episode["vector"]) for episode in replay.episodes()))
        dataset = iter(cluster.dataset(lambda batch: replay.dataset(batch, 4), 4))
        metrics, checksums = [], []
        for step in range(3):
            if step == 1 and cluster.is_chief:
                next(dataset)  # an extra batch on the chief only (as for a video report) must not block
            metrics.append({k: float(v) for k, v in agent.train(next(dataset))[0].items()})
            checksums.append(float(sum(np.sum(v.astype(np.float64)) for v in _values(agent))))
    votes = {"all_mixed": cluster.agree(cluster.is_chief, "all"), "any_mixed": cluster.agree(cluster.is_chief, "any"),
             "all_true": cluster.agree(True, "all"), "chief_no": cluster.agree(not cluster.is_chief, "chief"),
             "chief_yes": cluster.agree(cluster.is_chief, "chief")}
    # Diverge a counter and a weight on purpose, then broadcast: every worker must hold the chief's values.
    agent.step.assign(100 if cluster.is_chief else 7)
    if not cluster.is_chief:
        weight = agent.wm.variables_to_train[0]
        weight.assign(weight + 1.0)
    cluster.broadcast(agent)
    out.write_text(json.dumps({
        "num_workers": cluster.num_workers, "is_chief": cluster.is_chief, "replicas": cluster.num_replicas,
        "data_checksum": data_checksum, "weights_checksums": checksums, "metrics": metrics, "agree": votes,
        "after_broadcast": int(agent.step.numpy()), "chief_value": 100,
        "broadcast_checksum": float(sum(np.sum(v.astype(np.float64)) for v in _values(agent)))}))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    scenario, path = sys.argv[1], Path(sys.argv[2])
    {"mirrored": _child_mirrored, "mixed16": _child_mixed16, "multi_worker": _child_multi_worker}[scenario](path)
