"""Benchmark script output and the FLOP / parameter counts behind it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dreamerv2_tf.config import build
from dreamerv2_tf.tools import flops

REPO = Path(__file__).resolve().parent.parent
BENCH = str(REPO / "scripts" / "bench.py")
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
ATARI_OBS = {"image": (64, 64, 1)}


def run_bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


# ---------------------------------------------------------------- the script


def test_bench_prints_one_json_object_with_every_field():
    proc = run_bench("--configs", "defaults", "debug", "--steps", "3", "--warmup", "1", "--policy_steps", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # nothing but the JSON on stdout
    result = json.loads(lines[0])

    config = build(["defaults", "debug"])
    assert result["config"] == ["defaults", "debug"]
    assert result["precision"] == "32"
    assert result["jit"] is False
    assert (result["batch"], result["length"]) == (config.dataset.batch, config.dataset.length) == (4, 10)
    assert result["imag_horizon"] == config.imag_horizon
    assert result["obs_shapes"] == {"image": [64, 64, 1]} and result["act_dim"] == 18
    assert result["steps"] == 3 and result["policy_steps"] == 5

    params = result["params"]
    assert set(params) == {"world_model", "actor", "critic"}
    assert all(value > 0 for value in params.values())
    assert params == flops.param_counts(config, ATARI_OBS, 18, True)

    train = result["train_step_ms"]
    assert 0 < train["min"] <= train["median"] <= train["max"]
    assert train["min"] <= train["mean"] <= train["max"]
    policy = result["policy_step_ms"]
    assert 0 < policy["min"] <= policy["median"]
    per_env = result["policy_ms_per_env_step"]
    assert set(per_env) == {"1", "4", "16"} and all(value > 0 for value in per_env.values())
    assert per_env["1"] == pytest.approx(policy["median"], abs=1e-3)  # the same timings for one env
    assert result["compile_s"] > 0

    median_s = train["median"] / 1000
    assert result["replayed_steps_per_s"] == pytest.approx(4 * 10 / median_s, rel=1e-3)
    assert result["imagined_states_per_s"] == pytest.approx(4 * 10 * config.imag_horizon / median_s, rel=1e-3)
    expected = flops.update_flops(config, ATARI_OBS, 18, True)
    assert result["flops_per_update"] == expected["total"] > 0
    assert result["flops_parts"]["world_model"] + result["flops_parts"]["behavior"] == expected["total"]
    assert result["achieved_flops_per_s"] == pytest.approx(expected["total"] / median_s, rel=1e-3)
    assert result["policy_flops_per_step"] > 0
    assert result["matmul_flops_per_s"] > 1e8
    assert result["fraction_of_matmul"] == pytest.approx(
        result["achieved_flops_per_s"] / result["matmul_flops_per_s"], abs=1e-3)

    assert result["peak_memory_mb"] > 50  # TensorFlow alone takes more than this
    assert result["device"].startswith(("CPU: ", "GPU: "))
    assert result["tensorflow"].startswith("2.")


def test_loop_mode_times_the_training_loop_on_the_real_task():
    proc = run_bench("--configs", "defaults", "debug", "--loop", "6", "--warmup", "1",
                     "--time_limit", "100", "--action_repeat", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["task"] == "atari_pong" and result["train_every"] == 10
    loop = result["loop"]
    assert loop["updates"] == 6 and loop["agent_steps"] == 60
    parts = loop["seconds_per_update"]
    assert set(parts) == {"update", "policy", "env", "replay", "other"}
    assert parts["update"] > 0 and parts["policy"] > 0 and parts["env"] > 0
    assert loop["agent_steps_per_s"] == pytest.approx(60 / loop["loop_s"], rel=1e-2)
    assert loop["log_s"] > 0 and loop["save_s"] > 0  # one of each, timed
    # debug: a log every 100 agent steps = 10 updates, a checkpoint every 500 = 50.
    assert loop["updates_per_log"] == 10 and loop["updates_per_save"] == 50
    fractions = loop["fractions_at_config_cadence"]
    assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-3)
    assert fractions["log"] == pytest.approx(loop["log_s"] / 10 / sum(
        [*parts.values(), loop["log_s"] / 10, loop["save_s"] / 50]), rel=0.02)
    assert loop["outside_update_fraction"] == pytest.approx(1 - fractions["update"], abs=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--configs", "defaults", "nope"], "unknown config name 'nope'"),
    (["--loop", "-1"], "--loop must be at least 0"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--warmup", "x"], "--warmup needs an integer"),
    (["--obs", "image", "--act", "discrete:4"], "--obs item 'image'"),
    (["--obs", "vector:4"], "--obs needs --act"),
    (["--act", "box:3"], "--act must be discrete:N or continuous:N"),
    (["--task", "mario_world"], "unknown task 'mario_world'"),
    (["--rssm.detr", "3"], "unknown config key 'rssm.detr'"),
    (["--size", "16,16"], "are too small"),
])
def test_bench_bad_input_is_one_line_and_exit_2(args, message):
    proc = run_bench(*args, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr


# ---------------------------------------------------------------- layer formulas


def test_dense_formula():
    assert flops.dense_flops(7, 5) == 70  # 35 multiply-adds
    assert flops.dense(7, 5) == flops.Cost(70, 7 * 5 + 5)
    assert flops.dense(7, 5, bias=False, norm="layer") == flops.Cost(70, 7 * 5 + 2 * 5)


def test_conv_formula():
    # 16x16x3 -> 8 filters, kernel 4, stride 2, valid: (16 - 4) // 2 + 1 = 7 per side.
    assert flops.conv2d_out_size(16, 4, 2) == 7
    assert flops.conv2d_flops((16, 16), 3, 8, 4, 2) == 2 * 7 * 7 * (4 * 4 * 3) * 8 == 37632


def test_transposed_conv_formula():
    # 5x5x6 -> 8 filters, kernel 5, stride 2, valid: (5 - 1) * 2 + 5 = 13 per side.
    # Each of the 25 input pixels scatters a 5x5x8 patch from its 6 channels.
    assert flops.conv2d_transpose_out_size(5, 5, 2) == 13
    assert flops.conv2d_transpose_flops((5, 5), 6, 8, 5) == 2 * 25 * 25 * 6 * 8 == 60000


def test_formulas_match_tensorflow_profiler():
    tf = pytest.importorskip("tensorflow")

    def profile(fn, spec):
        graph = tf.function(fn).get_concrete_function(spec).graph
        options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
        options["output"] = "none"
        return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops

    weight = tf.zeros([7, 5])
    assert profile(lambda x: tf.matmul(x, weight), tf.TensorSpec([3, 7])) == 3 * flops.dense_flops(7, 5)
    kernel = tf.zeros([4, 4, 3, 8])
    conv = profile(lambda x: tf.nn.conv2d(x, kernel, 2, "VALID"), tf.TensorSpec([2, 16, 16, 3]))
    assert conv == 2 * flops.conv2d_flops((16, 16), 3, 8, 4, 2)
    # TensorFlow estimates transposed convs from output size / stride, exact when kernel == stride.
    kernel = tf.zeros([2, 2, 8, 6])
    deconv = profile(lambda x: tf.nn.conv2d_transpose(x, kernel, [2, 10, 10, 8], 2, "VALID"),
                     tf.TensorSpec([2, 5, 5, 6]))
    assert deconv == 2 * flops.conv2d_transpose_flops((5, 5), 6, 8, 2)


# ---------------------------------------------------------------- networks and updates


def test_encoder_cost_by_hand():
    config = build(["defaults", "debug"])  # cnn_depth 4, kernels 4, 4, 4, 4
    cost, embed = flops.encoder(config.encoder, ATARI_OBS)
    # Sides 64 -> 31 -> 14 -> 6 -> 2, depths 1 -> 4 -> 8 -> 16 -> 32.
    by_hand = (2 * 31 * 31 * 16 * 1 * 4 + 2 * 14 * 14 * 16 * 4 * 8 + 2 * 6 * 6 * 16 * 8 * 16
               + 2 * 2 * 2 * 16 * 16 * 32)
    assert cost.flops == by_hand == 536704
    assert embed == 2 * 2 * 32


def test_atari_sizes_match_the_paper():
    config = build(["defaults", "atari"])
    params = flops.param_counts(config, ATARI_OBS, 18, True)
    assert 19e6 < params["world_model"] < 21e6  # about 20M (paper Table 3)
    assert 1.0e6 < params["actor"] < 1.3e6 and 1.0e6 < params["critic"] < 1.3e6


def test_update_flops_scale_with_batch_and_split_into_parts():
    small = build(["defaults", "debug"])
    double = build(["defaults", "debug"], {"dataset.batch": 8})
    one = flops.update_flops(small, ATARI_OBS, 18, True)
    two = flops.update_flops(double, ATARI_OBS, 18, True)
    assert two["total"] == 2 * one["total"]
    parts = {k: v for k, v in one.items() if k not in ("world_model", "behavior", "total")}
    assert sum(parts.values()) == one["total"]
    assert all(value > 0 for value in parts.values())


def test_dynamics_backprop_adds_backward_through_imagination():
    reinforce = build(["defaults", "debug"], {"actor_grad": "reinforce"})
    dynamics = build(["defaults", "debug"], {"actor_grad": "dynamics"})
    a = flops.update_flops(reinforce, ATARI_OBS, 18, True)
    b = flops.update_flops(dynamics, ATARI_OBS, 18, True)
    nets = flops.networks(reinforce, ATARI_OBS, 18, True)
    n, horizon = 4 * 10, reinforce.imag_horizon
    assert a["imagine_rssm"] == horizon * n * nets["img_step"].flops  # forward only
    assert b["imagine_rssm"] == 2 * a["imagine_rssm"]  # plus one pass of input gradients
    assert "actor_baseline" in a and "actor_baseline" not in b
    assert a["world_model"] == b["world_model"]
    assert b["behavior"] > a["behavior"]


def test_no_discount_head_without_pred_discount():
    config = build(["defaults", "debug"], {"pred_discount": False})
    result = flops.update_flops(config, ATARI_OBS, 18, True)
    assert "discount_head" not in result and "imagine_discount" not in result


def test_bad_shapes_and_patterns_are_clear_errors():
    config = build(["defaults", "debug"])
    with pytest.raises(ValueError, match="produce 64x64 images, but the images are 72x72"):
        flops.update_flops(config, {"image": (72, 72, 1)}, 18, True)
    with pytest.raises(ValueError, match="no observation key matches"):
        flops.update_flops(build(["defaults", "atari"]), {"pixels": (64, 64, 1)}, 18, True)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        flops.update_flops(build(["defaults", "debug"], {"encoder.cnn_keys": "("}), ATARI_OBS, 18, True)


def test_param_counts_match_the_built_agent():
    """The shape model in flops.py agrees with the Keras layers: same trainable parameter counts."""
    pytest.importorskip("tensorflow")
    import keras

    from dreamerv2_tf.algo.agent import Agent, set_precision
    from dreamerv2_tf.envs import base

    # Layer norm everywhere, Gaussian latents, an image plus a vector, continuous actions.
    config = build(["defaults", "debug"], {".*\\.norm": "layer", "rssm.discrete": 0, "pred_discount": False})
    obs = {"image": base.image_space((64, 64), 3), "position": base.vector_space((7,)), **base.flag_spaces()}
    keras.backend.clear_session()
    agent = Agent(obs, base.continuous_act_space(6), config, set_precision("32"))
    shapes = {"image": (64, 64, 3), "position": (7,)}
    assert agent.param_counts() == flops.param_counts(config, shapes, 6, False)
