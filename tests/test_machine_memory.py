"""Memory on shared machines: the `gpu_memory` key (with TensorFlow's device list mocked) and the replay's
memory at capacity against the machine's, with the figures docs/performance.md gives for the named configs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from gymnasium import spaces

from dreamerv2_tf import config as configlib
from dreamerv2_tf.envs import base
from dreamerv2_tf.loop import replay_memory
from dreamerv2_tf.loop.gpu_memory import configure_gpu_memory
from dreamerv2_tf.loop.replay_memory import machine_memory, report_replay_memory, step_bytes

ROOT = Path(__file__).resolve().parent.parent


# ---- gpu_memory ------------------------------------------------------------------------------------------


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two GPUs in TensorFlow's device list; what is set on them is recorded instead of applied."""
    gpus = [tf.config.PhysicalDevice(f"/physical_device:GPU:{index}", "GPU") for index in range(2)]
    calls = []
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth",
                        lambda device, enable: calls.append(("growth", device.name, enable)))
    monkeypatch.setattr(tf.config, "set_logical_device_configuration",
                        lambda device, logical: calls.append(("limit", device.name, logical[0].memory_limit)))
    return calls


def test_growth_is_set_on_every_gpu(fake_gpus):
    assert configure_gpu_memory("growth") == "gpu_memory: growth (memory allocated as needed on 2 GPUs)"
    assert fake_gpus == [("growth", "/physical_device:GPU:0", True), ("growth", "/physical_device:GPU:1", True)]


def test_a_limit_in_mib_makes_a_logical_device_of_that_size(fake_gpus):
    assert configure_gpu_memory("4096") == "gpu_memory: 4096 (at most 4096 MiB on 2 GPUs)"
    assert fake_gpus == [("limit", "/physical_device:GPU:0", 4096), ("limit", "/physical_device:GPU:1", 4096)]


def test_all_leaves_the_gpus_as_tensorflow_sets_them(fake_gpus):
    assert configure_gpu_memory("all") == "gpu_memory: all (TensorFlow reserves nearly all memory on 2 GPUs)"
    assert fake_gpus == []


def test_gpus_already_initialised_give_a_warning_not_a_failure(monkeypatch, fake_gpus):
    def initialised(device, enable):
        raise RuntimeError("Physical devices cannot be modified after being initialized")

    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", initialised)
    with pytest.warns(RuntimeWarning, match="gpu_memory growth not applied: TensorFlow had already initialised"):
        assert configure_gpu_memory("growth") == "gpu_memory: growth not applied (GPUs already initialised)"


def test_without_a_gpu_the_line_says_so():
    assert configure_gpu_memory("growth") == "gpu_memory: growth (no GPU visible)"  # tests hide the GPUs


@pytest.mark.parametrize("value", ["half", "0", "-5", "1.5", ""])
def test_bad_gpu_memory_values_are_refused_in_one_line(value):
    with pytest.raises(configlib.ConfigError, match="gpu_memory must be all, growth or a positive number of MiB"):
        configlib.build(["defaults"], {"gpu_memory": value})


def test_gpu_memory_values_from_the_command_line():
    assert configlib.build(["defaults"]).gpu_memory == "all"
    assert configlib.build(["defaults"], {"gpu_memory": 3000}).gpu_memory == "3000"
    assert configlib.gpu_memory_setting("3000") == 3000 and configlib.gpu_memory_setting("Growth") == "growth"


# ---- the replay's memory ---------------------------------------------------------------------------------


def atari_spaces(actions: int = 18) -> tuple[dict, dict]:
    return {"image": base.image_space((64, 64), 1), **base.flag_spaces()}, base.discrete_act_space(actions)


def test_step_bytes_count_every_stored_key():
    obs, act = atari_spaces()
    assert step_bytes(obs, act) == 64 * 64 * 1 + 18 * 4 + 4 + 3  # image, one-hot action, reward, flags
    obs["log_count"] = spaces.Box(0, 10, (), np.int32)  # logged keys are held in memory too
    obs["ram"] = spaces.Box(-1, 1, (128,), np.float64)  # stored as float32
    assert step_bytes(obs, act) == 4175 + 4 + 128 * 4


def test_replay_larger_than_the_machine_is_warned_about():
    obs, act = atari_spaces()
    with pytest.warns(RuntimeWarning, match=r"the replay at capacity \(9.19 GB\) exceeds this machine's memory "
                                            r"\(4 GB\) and would run out of it; lower replay.capacity "
                                            r"\(958,083 steps fill the machine\)"):
        line = report_replay_memory(obs, act, 2_000_000, 200_000, available=4 * 10**9)
    assert line == ("replay: 9.19 GB at capacity (4,175 bytes per step x 2,000,000 training and 200,000 eval "
                    "steps); the machine has 4 GB")


def test_replay_that_fits_prints_one_line_without_a_warning(recwarn):
    obs, act = atari_spaces()
    line = report_replay_memory(obs, act, 100_000, available=24 * 10**9)
    assert line == "replay: 418 MB at capacity (4,175 bytes per step x 100,000 steps); the machine has 24 GB"
    assert report_replay_memory(obs, act, 0) == "replay: 4,175 bytes per step, no capacity limit (replay.capacity 0)"
    assert not [warning for warning in recwarn if issubclass(warning.category, RuntimeWarning)]


def test_machine_memory_is_the_lower_of_the_ram_and_a_cgroup_limit(tmp_path, monkeypatch):
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(replay_memory, "CGROUP_LIMITS", (limit,))
    limit.write_text("max\n")  # cgroup v2 without a limit
    physical = machine_memory()
    assert physical and physical > 10**8
    limit.write_text(f"{2 * 10**9}\n")
    assert machine_memory() == min(physical, 2 * 10**9)


# ---- docs/performance.md ----------------------------------------------------------------------------------

ROW = re.compile(r"^\| `([^`]+)` \| ([\w.-]+) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+ [GM]B) \|$")


def test_the_replay_figures_in_the_docs_are_those_of_the_named_configs():
    from dreamerv2_tf.envs.configured import run_envs

    rows = [ROW.match(line) for line in (ROOT / "docs" / "performance.md").read_text().splitlines()]
    rows = [row.groups() for row in rows if row]
    named = set(configlib.read_named_configs()) - {"defaults"}
    assert {names.split()[-1] for names, *_ in rows} == named  # every named config, once
    for names, task, per_step, capacity, total in rows:
        config = configlib.build(["defaults", *names.split()])
        env = run_envs(config, "eval", 0, 1)[0]
        try:
            measured = step_bytes(env.obs_space, env.act_space)
        finally:
            env.close()
        assert (task, int(per_step.replace(",", "")), int(capacity.replace(",", ""))) == (
            config.task, measured, config.replay.capacity), names
        held = config.replay.capacity + config.replay.capacity // 10  # the eval replay's tenth (loop/training.py)
        assert total == replay_memory.gigabytes(measured * held), names
