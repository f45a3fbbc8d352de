"""The training loop end to end: scripts/train.py on real ALE Pong with the `debug` config, resume after a
kill, Ctrl-C, config changes on resume, --from_checkpoint, scripts/eval.py and `dreamerv2_tf.train(env_fn)`.

Each subprocess run costs ~20-40 s (mostly TensorFlow tracing), so runs are shared through module-scoped
fixtures: `pong_run` is one finished run that several tests read (tests that resume it work on a copy),
and `interrupted` kills a run, restarts it and stops it with SIGINT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from dreamerv2_tf import config as configlib
from dreamerv2_tf.envs.configured import env_kwargs, run_envs
from dreamerv2_tf.loop import rundir
from dreamerv2_tf.loop import training as trainlib
from dreamerv2_tf.loop.clocks import Every
from dreamerv2_tf.loop.logger import read_metrics
from dreamerv2_tf.loop.stop import Stop

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"
EVAL_SCRIPT = ROOT / "scripts" / "eval.py"
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
REPEAT = 4
TIME_LIMIT = 50
# Short Pong episodes (time limit) and every periodic action each 100 agent steps.
PONG = ["--configs", "defaults", "debug", "--task", "atari_pong", "--time_limit", str(TIME_LIMIT),
        "--action_repeat", str(REPEAT), "--prefill", "100", "--log_every", "100", "--eval_every", "100",
        "--checkpoint_every", "100"]
LOSSES = ("model_loss", "actor_loss", "critic_loss")


def train_cmd(logdir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(TRAIN_SCRIPT), *PONG, "--logdir", str(logdir), *extra]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def episode_files(logdir: Path, kind: str = "train") -> set[str]:
    return {path.name for path in (logdir / f"{kind}_episodes").glob("*.npz")}


def checkpoint_number(logdir: Path) -> int | None:
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(logdir / "checkpoints"))
    return int(latest.rsplit("-", 1)[-1]) if latest else None


def checkpoint_values(path: str) -> dict[str, np.ndarray]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def error_line(result: subprocess.CompletedProcess) -> str:
    """The whole stderr of a failed script: exactly one line starting with 'error:'."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not _tf_noise(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _tf_noise(line: str) -> bool:
    # Start-up chatter on stderr: TensorFlow/absl lines that TF_CPP_MIN_LOG_LEVEL does not silence, ALE's banner.
    return bool(re.match(r"^(WARNING: All log messages before absl|[IWE]\d{4} |A\.L\.E: |\[Powered by Stella\])",
                         line))


def wait_for(condition, timeout: float, process: subprocess.Popen, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} while waiting for {what}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# ---- one finished run ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pong_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    logdir = tmp_path_factory.mktemp("pong") / "run"
    result = run(train_cmd(logdir, "--steps", "300"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return logdir, result


def test_run_writes_config_episodes_and_checkpoint(pong_run):
    logdir, result = pong_run
    saved = configlib.Config.load(logdir / "config.yaml")
    assert saved.task == "atari_pong" and saved.steps == 300 and saved.action_repeat == REPEAT
    assert saved.rssm.deter == configlib.build(["defaults", "debug"]).rssm.deter
    train_files = sorted((logdir / "train_episodes").glob("*.npz"))
    assert len(train_files) >= 300 // TIME_LIMIT - 1 and episode_files(logdir, "eval")
    with np.load(train_files[0]) as episode:
        length = len(episode["reward"])
        assert length == TIME_LIMIT + 1  # the reset step plus one per agent step
        assert episode["image"].shape == (length, 64, 64, 1) and episode["image"].dtype == np.uint8
        assert episode["action"].shape == (length, 18)
        assert episode["is_first"][0] and not episode["is_first"][1:].any() and episode["is_last"][-1]
    assert checkpoint_number(logdir) == 300
    assert "finished at step 300" in result.stdout


def test_metrics_jsonl_has_returns_losses_steps_and_frames(pong_run):
    logdir, _ = pong_run
    records = read_metrics(logdir)
    steps = [record["step"] for record in records]
    # Steps never go back; an eval episode has a line of its own at the step it was played.
    assert steps == sorted(steps) and steps[-1] == 300
    assert all(record["frames"] == record["step"] * REPEAT for record in records)
    for key in ("train_return", "eval_return", *LOSSES):
        values = [record[key] for record in records if key in record]
        assert values and all(np.isfinite(values)), key
    # Pong scores lie in [-21, 21] and a 50-step episode cannot reach them.
    assert all(abs(record["train_return"]) <= 21 for record in records if "train_return" in record)


TIME_SECTIONS = ("time_policy", "time_env", "time_replay", "time_update", "time_eval", "time_log", "time_save")


def test_metrics_show_where_the_wall_clock_goes(pong_run):
    logdir, result = pong_run
    records = [record for record in read_metrics(logdir) if "time_update" in record]
    assert len(records) >= 2  # every log after the first interval of the loop
    for record in records:
        fractions = {key: value for key, value in record.items() if key.startswith("time_")}
        assert set(fractions) <= set(TIME_SECTIONS), fractions
        assert {"time_policy", "time_env", "time_replay", "time_update"} <= set(fractions)
        assert all(0 < value < 1 for value in fractions.values()) and sum(fractions.values()) <= 1.0
    # Every interval of 100 agent steps has an evaluation and a checkpoint, which show up from the second on.
    assert any("time_eval" in record and "time_save" in record for record in records)
    assert "precision: 32" in result.stdout and "jit: off (the train step)" in result.stdout
    assert "gpu_memory: all (no GPU visible)" in result.stdout
    assert ("replay: 459 MB at capacity (4,175 bytes per step x 100,000 training and 10,000 eval steps); the "
            "machine has") in result.stdout


def test_scores_and_plot_scripts_read_the_real_run(pong_run, tmp_path):
    from dreamerv2_tf.tools import scores

    logdir, _ = pong_run
    records = [r for r in read_metrics(logdir) if r.get("eval_return") is not None]
    curve = scores.read_curve(logdir)
    assert curve.task == "atari_pong" and list(curve.step) == [r["step"] for r in records]
    assert scores.final_score(curve) == records[-1]["eval_return"]
    table = run([sys.executable, str(ROOT / "scripts" / "scores.py"), str(logdir), "--allow-partial"])
    assert table.returncode == 0 and "PARTIAL" in table.stdout and "covers 1 of 55 games" in table.stdout
    out = tmp_path / "curve.png"
    plot = run([sys.executable, str(ROOT / "scripts" / "plot.py"), str(logdir), "--out", str(out)])
    assert plot.returncode == 0, plot.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_has_the_same_scalars_and_gif_videos(pong_run):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    logdir, _ = pong_run
    accumulator = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["tensors"])
    assert {"train_return", "eval_return", *LOSSES} <= tags
    records = read_metrics(logdir)
    for key in ("eval_return", *LOSSES):
        logged = {record["step"]: record[key] for record in records if key in record}
        board = {event.step: float(tensor_util.make_ndarray(event.tensor_proto))
                 for event in accumulator.Tensors(key)}
        assert board.keys() == logged.keys(), key
        np.testing.assert_allclose([board[s] for s in logged], list(logged.values()), rtol=1e-5)
    videos = [tag for tag in tags if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "images"]
    assert "eval_policy_image" in videos
    width, height, blob = tensor_util.make_ndarray(accumulator.Tensors("eval_policy_image")[-1].tensor_proto)
    assert (int(width), int(height)) == (64, 64) and blob[:4] == b"GIF8"
    # The open-loop report on evaluation episodes, beside the one on training data: truth | model | error.
    assert {"openl_image", "eval_openl_image"} <= set(videos)
    width, height, _ = tensor_util.make_ndarray(accumulator.Tensors("eval_openl_image")[-1].tensor_proto)
    assert (int(width), int(height)) == (4 * 64, 3 * 64)  # the debug batch of 4 side by side
    assert list((logdir / "videos").glob("eval_openl_image_*.gif"))


# ---- SIGINT ----------------------------------------------------------------------------------------------
# (kill -9 and the resume after it: tests/test_faults.py)


@dataclass
class Interrupted:
    logdir: Path
    output: str
    code: int


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Interrupted:
    """Start a long run and SIGINT it once its training loop has logged."""
    logdir = tmp_path_factory.mktemp("interrupted") / "run"
    metrics = logdir / "metrics.jsonl"
    out = logdir.parent / "run.log"
    with open(out, "w") as log:
        process = subprocess.Popen(train_cmd(logdir, "--steps", "5000"), stdout=log, stderr=subprocess.STDOUT,
                                   env=ENV, cwd=ROOT)
        try:
            # Once a line with losses exists the loop runs, so the signal arrives mid-training.
            wait_for(lambda: metrics.exists() and "model_loss" in metrics.read_text(), 240, process, "a log line")
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return Interrupted(logdir, out.read_text(), code)


def test_sigint_finishes_update_saves_and_exits_zero(interrupted):
    assert interrupted.code == 0, interrupted.output[-3000:]
    output = interrupted.output
    assert "received SIGINT" in output
    stopped = int(re.search(r"stopped at step ([\d,]+)", output).group(1).replace(",", ""))
    assert stopped < 5000 and checkpoint_number(interrupted.logdir) == stopped
    import tensorflow as tf

    values = checkpoint_values(tf.train.latest_checkpoint(str(interrupted.logdir / "checkpoints")))
    assert int(values["step/.ATTRIBUTES/VARIABLE_VALUE"]) == stopped
    assert int(values["agent/step/.ATTRIBUTES/VARIABLE_VALUE"]) > 1  # updates were made and kept


# ---- config changes on resume, --from_checkpoint ---------------------------------------------------------


def copy_run(pong_run, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(pong_run[0], target)
    return target


def test_resume_with_a_different_architecture_exits_2_naming_the_key(pong_run, tmp_path):
    logdir = copy_run(pong_run, tmp_path)
    saved = (logdir / "config.yaml").read_text()
    result = run(train_cmd(logdir, "--steps", "300", "--rssm.deter", "64"), timeout=120)
    assert result.returncode == 2
    line = error_line(result)
    assert "rssm.deter" in line and "64" in line
    assert (logdir / "config.yaml").read_text() == saved  # the refused run leaves the logdir alone


def test_resume_with_more_steps_continues(pong_run, tmp_path):
    logdir = copy_run(pong_run, tmp_path)
    old = read_metrics(logdir)
    result = run(train_cmd(logdir, "--steps", "400"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The copy lives at another path, so logdir changed too; neither refuses the resume.
    assert re.search(r"resuming with changed keys: logdir, steps\n", result.stdout)
    assert "continuing at agent step 300" in result.stdout
    records = read_metrics(logdir)
    assert records[:len(old)] == old
    # The first run ended at 300 without evaluating; the resumed one starts its block with an evaluation.
    new = records[len(old):]
    assert new[0]["step"] == 300 and "eval_return" in new[0] and records[-1]["step"] == 400
    assert checkpoint_number(logdir) == 400
    assert configlib.Config.load(logdir / "config.yaml").steps == 400


def test_from_checkpoint_starts_a_new_logdir_with_the_saved_weights(pong_run, tmp_path):
    import tensorflow as tf

    source = pong_run[0]
    logdir = tmp_path / "fresh"
    # Steps equal to prefill and no pretraining: only the first update runs, at learning rates too small
    # to change a float32 weight and without weight decay, so the final checkpoint holds what was loaded.
    tiny = [arg for name in ("model", "actor", "critic")
            for arg in (f"--{name}_opt.lr", "1e-30", f"--{name}_opt.wd", "0")]
    result = run(train_cmd(logdir, "--from_checkpoint", str(source), "--steps", "100", "--pretrain", "0", *tiny))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "initialised weights from" in result.stdout and "resumed from" not in result.stdout
    loaded = checkpoint_values(tf.train.latest_checkpoint(str(logdir / "checkpoints")))
    saved = checkpoint_values(tf.train.latest_checkpoint(str(source / "checkpoints")))
    agent_keys = [key for key in saved if key.startswith("agent/")]
    assert len(agent_keys) > 50 and set(agent_keys) == {key for key in loaded if key.startswith("agent/")}
    # Network weights are copied; optimizer state and update counters start afresh from the new config.
    fresh = [key for key in agent_keys if "_opt/" in key or "/opt/" in key or key.startswith(
        ("agent/step/", "agent/env_step/", "agent/ac/updates/"))]
    weights = [key for key in agent_keys if key not in fresh]
    assert len(weights) > 20 and any(key.startswith("agent/wm/rssm/") for key in weights)
    for key in weights:
        if "/slow_critic/" not in key:  # the first update copies the critic into the slow critic
            np.testing.assert_array_equal(loaded[key], saved[key], err_msg=key)
    lr = "agent/wm/opt/opt/_learning_rate/.ATTRIBUTES/VARIABLE_VALUE"
    iterations = "agent/wm/opt/opt/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
    assert float(saved[lr]) > 1e-6 and np.isclose(float(loaded[lr]), 1e-30, rtol=1e-3, atol=0)
    assert int(saved[iterations]) > 1 and int(loaded[iterations]) == 1  # the first update only
    assert int(saved["agent/step/.ATTRIBUTES/VARIABLE_VALUE"]) > 0
    assert int(loaded["agent/step/.ATTRIBUTES/VARIABLE_VALUE"]) == 1
    assert int(loaded["step/.ATTRIBUTES/VARIABLE_VALUE"]) == 100  # the agent step starts afresh


def test_from_checkpoint_missing_path_exits_2(tmp_path):
    result = run(train_cmd(tmp_path / "run", "--from_checkpoint", str(tmp_path / "nothing")), timeout=120)
    assert result.returncode == 2 and "no checkpoint" in error_line(result)
    assert not (tmp_path / "run").exists()  # refused before the run wrote anything


# ---- scripts/eval.py -------------------------------------------------------------------------------------


def test_eval_script_reports_statistics_json_and_gif(pong_run, tmp_path):
    import imageio.v3 as iio

    logdir = copy_run(pong_run, tmp_path)
    video = tmp_path / "out.gif"
    result = run([sys.executable, str(EVAL_SCRIPT), "--logdir", str(logdir), "--episodes", "2",
                  "--video", str(video)], timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"return mean -?[\d.]+ std [\d.]+ min -?[\d.]+ max -?[\d.]+ over 2 episodes", result.stdout)
    report = json.loads((logdir / "eval_results.json").read_text())
    assert len(report["returns"]) == 2 and report["lengths"] == [TIME_LIMIT, TIME_LIMIT]
    assert report["mean"] == pytest.approx(np.mean(report["returns"]))
    assert report["min"] <= report["mean"] <= report["max"]
    assert report["checkpoint"].endswith("ckpt-300")
    frames = iio.imread(video, index=None)
    # The GIF encoder merges identical consecutive frames (Pong's opening), so up to one per step.
    assert 2 <= frames.shape[0] <= TIME_LIMIT + 1 and frames.shape[1:3] == (64, 64)
    assert len(np.unique(frames.reshape(len(frames), -1), axis=0)) > 1


def test_eval_script_without_config_exits_2(tmp_path):
    result = run([sys.executable, str(EVAL_SCRIPT), "--logdir", str(tmp_path), "--episodes", "1"], timeout=120)
    assert result.returncode == 2 and "config.yaml" in error_line(result)


# ---- Python API ------------------------------------------------------------------------------------------


def cartpole_config(logdir: Path) -> configlib.Config:
    vector = configlib.read_named_configs()["vector"]
    return configlib.build(["defaults", "debug"], {
        "encoder": vector["encoder"], "decoder": vector["decoder"], "log_keys_video": [],
        "logdir": str(logdir), "steps": 300, "prefill": 100, "time_limit": 100,
        "log_every": 100, "eval_every": 150, "checkpoint_every": 100})


def test_python_api_trains_a_gymnasium_env_in_process(tmp_path):
    import gymnasium
    import keras

    import dreamerv2_tf
    from dreamerv2_tf.loop.evaluate import evaluate

    calls = []

    def env_fn():
        calls.append(1)
        return gymnasium.make("CartPole-v1")

    handler = signal.getsignal(signal.SIGINT)
    try:
        logdir = dreamerv2_tf.train(env_fn, cartpole_config(tmp_path / "cartpole"), seed=3)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert signal.getsignal(signal.SIGINT) is handler  # the Ctrl-C handler is only installed while training
    assert Path(logdir) == tmp_path / "cartpole" and len(calls) == 2  # one train env, one eval env
    assert configlib.Config.load(logdir / "config.yaml").seed == 3
    records = read_metrics(logdir)
    assert records[-1]["step"] == 300 and all(r["frames"] == r["step"] for r in records)
    for key in ("train_return", "eval_return", *LOSSES):
        assert any(key in record for record in records), key
    # CartPole pays 1 per step, so a return equals the episode length (at most the time limit).
    for record in records:
        if "train_return" in record:
            assert 1 <= record["train_return"] <= 100
    with np.load(sorted((logdir / "train_episodes").glob("*.npz"))[0]) as episode:
        assert episode["vector"].shape[1:] == (4,) and episode["action"].shape[1:] == (2,)
    assert checkpoint_number(logdir) == 300
    # The recorded task says the env came from Python: eval.py refuses, evaluate(env_fn=...) works.
    assert configlib.Config.load(logdir / "config.yaml").task == "custom_gym_CartPole-v1"
    result = run([sys.executable, str(EVAL_SCRIPT), "--logdir", str(logdir), "--episodes", "1"], timeout=120)
    assert result.returncode == 2 and "evaluate(logdir, env_fn=...)" in error_line(result)
    try:
        report = evaluate(logdir, episodes=2, env_fn=env_fn)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert len(calls) == 3 and report["task"] == "custom_gym_CartPole-v1"
    assert report["lengths"] == [int(r) for r in report["returns"]]  # CartPole pays 1 per step
    assert all(1 <= length <= 100 for length in report["lengths"])


def test_deterministic_runs_with_the_same_seed_log_identical_metrics(tmp_path):
    """--deterministic true: op determinism and batches sampled on request, so timing cannot change them."""
    args = ["--configs", "defaults", "debug", "vector", "--task", "gym_CartPole-v1", "--seed", "5",
            "--deterministic", "true", "--steps", "400", "--prefill", "100", "--train_every", "5",
            "--eval_every", "200", "--log_every", "100", "--checkpoint_every", "0",
            "--rssm.deter", "16", "--rssm.hidden", "16", "--rssm.stoch", "4", "--rssm.discrete", "4",
            "--dataset.batch", "4", "--dataset.length", "8", "--replay.maxlen", "8"]
    timing = {"time", "fps", "updates_per_s", "ram_mb"}
    logs = []
    for name in ("first", "second"):
        result = run([sys.executable, str(TRAIN_SCRIPT), *args, "--logdir", str(tmp_path / name)])
        assert result.returncode == 0, result.stderr[-2000:]
        logs.append([{k: v for k, v in row.items() if k not in timing and not k.startswith("time_")}
                     for row in read_metrics(tmp_path / name)])
    assert any("model_loss" in row for row in logs[0]) and any("eval_return" in row for row in logs[0])
    assert logs[0] == logs[1]


def test_sigint_during_prefill_before_any_episode_saves_and_returns(tmp_path, capsys):
    import gymnasium
    import keras

    import dreamerv2_tf

    class InterruptAtStep5(gymnasium.Wrapper):
        """Ctrl-C from inside the env, at a known point of the prefill."""

        count = 0

        def step(self, action):
            InterruptAtStep5.count += 1
            if InterruptAtStep5.count == 5:
                signal.raise_signal(signal.SIGINT)
            return super().step(action)

    # MountainCar's random episodes run the full 200 steps, so the first 100-step chunk finishes none.
    config = cartpole_config(tmp_path / "run").update({"prefill": 1000, "steps": 2000, "time_limit": 0})
    try:
        logdir = dreamerv2_tf.train(lambda: InterruptAtStep5(gymnasium.make("MountainCar-v0")), config)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    output = capsys.readouterr().out
    assert "received SIGINT" in output and "stopped at step 100" in output
    assert not episode_files(logdir) and checkpoint_number(logdir) == 100


def test_train_api_builds_wrapped_gym_envs_and_names_the_logdir(monkeypatch):
    import gymnasium

    from dreamerv2_tf.envs.wrappers import ActionRepeat, TimeLimit

    made = []

    def env_fn():
        made.append(gymnasium.make("CartPole-v1"))
        return made[-1]

    captured = {}
    monkeypatch.setattr(trainlib, "run", lambda config, env_fn: captured.update(config=config, env_fn=env_fn))
    trainlib.train(env_fn, {"action_repeat": 2, "time_limit": 7, "seed": 5})
    config = captured["config"]
    make = lambda seed, mode: run_envs(config, mode, seed, 1, captured["env_fn"])[0]  # noqa: E731
    assert Path(config.logdir) == Path("logdir") / "custom_gym_CartPole-v1" / "seed5"
    assert config.task == "custom_gym_CartPole-v1"
    env = make(5, "train")
    assert len(made) == 1 and env.env.env._env is made[0]  # the env built to name the logdir is reused
    assert isinstance(env, TimeLimit) and isinstance(env.env, ActionRepeat) and env.limit == 7
    assert env.obs_space["vector"].shape == (4,)
    obs = env.reset()
    for index in range(7):
        assert not obs["is_last"]
        # Alternating pushes keep the pole up, so only the time limit ends the episode.
        obs = env.step({"action": np.eye(2, dtype=np.float32)[index % 2]})
    assert obs["is_last"] and not obs["is_terminal"]
    evaluation = make(6, "eval")
    assert evaluation.limit == 7 and len(made) == 2
    evaluation.close()
    env.close()


def test_train_time_limit_cuts_training_episodes_only(monkeypatch):
    import gymnasium

    captured = {}
    monkeypatch.setattr(trainlib, "run", lambda config, env_fn: captured.update(config=config, env_fn=env_fn))
    trainlib.train(lambda: gymnasium.make("CartPole-v1"), {"time_limit": 7, "train_time_limit": 3})
    config, env_fn = captured["config"], captured["env_fn"]
    assert run_envs(config, "train", 0, 1, env_fn)[0].limit == 3
    assert run_envs(config, "eval", 0, 1, env_fn)[0].limit == 7
    kwargs = env_kwargs(configlib.build(["defaults"], {"time_limit": 7, "train_time_limit": 3}), "eval")
    assert kwargs["time_limit"] == 7


def test_gym_env_accepts_an_instance_but_no_make_kwargs_with_it():
    import gymnasium

    from dreamerv2_tf.envs.gym import GymEnv

    env = GymEnv(gymnasium.make("CartPole-v1"), seed=0)
    assert env.reset()["vector"].shape == (4,) and env.act_space["action"].n == 2
    env.close()
    with pytest.raises(ValueError, match="apply only to an env id"):
        GymEnv(gymnasium.make("CartPole-v1"), max_episode_steps=5)
    with pytest.raises(ValueError, match="gymnasium env id or env instance"):
        GymEnv(42)


# ---- units -----------------------------------------------------------------------------------------------


def test_check_resume_allows_run_length_keys_and_refuses_architecture():
    saved = configlib.build(["defaults", "debug"])
    assert rundir.check_resume(saved, saved) == []
    assert rundir.check_resume(saved, saved.update({"steps": 9000, "log_every": 7})) == ["log_every", "steps"]
    for key, value in (("rssm.deter", 64), ("task", "atari_breakout"), ("model_opt.lr", 1.0),
                       ("precision", "16"), ("encoder.cnn_depth", 8)):
        with pytest.raises(configlib.ConfigError, match=re.escape(key)):
            rundir.check_resume(saved, saved.update({key: value, "steps": 5}))


def test_check_resume_counts_keys_added_since_the_run_as_their_defaults():
    saved = configlib.build(["defaults", "debug"])
    older = configlib.Config({**saved.to_dict(), "rssm": {k: v for k, v in saved.rssm.items() if k != "ensemble"}})
    assert rundir.check_resume(older, saved) == []
    with pytest.raises(configlib.ConfigError, match=re.escape("rssm.ensemble: 1 -> 3")):
        rundir.check_resume(older, saved.update({"rssm.ensemble": 3}))


def test_every_fires_on_multiples_of_the_interval():
    every = Every(100)
    assert [every(step) for step in (37, 60, 99, 100, 150, 230, 300, 301)] == [
        True, False, False, True, False, True, True, False]
    resumed = Every(100, last=150)  # resumed mid-interval: next at 200, not 250
    assert [resumed(step) for step in (160, 199, 200, 250, 300)] == [False, False, True, False, True]
    assert not any(Every(0)(step) for step in range(5))


def test_episode_metrics_returns_lengths_and_log_keys():
    episode = {"reward": np.array([0.0, 1.0, -2.0, 3.5]), "log_reward": np.array([0.0, 1.0, 1.0, 0.0]),
               "log_achievement_x": np.array([0, 0, 1, 1])}
    metrics = trainlib.episode_metrics(episode, "eval")
    assert metrics == {"eval_return": 2.5, "eval_length": 3.0, "eval_task_return": 2.0,
                       "eval_achievement_x": 1.0}
    episode["log_position"] = np.array([[0.0, 4.0], [2.0, 1.0], [1.0, 0.0], [3.0, 2.0]])
    patterns = {"sum": "^log_reward$", "mean": "^(reward|log_position)$", "max": "^log_"}
    metrics = trainlib.episode_metrics(episode, "train", patterns)
    assert metrics["train_sum_log_reward"] == 2.0
    assert metrics["train_mean_reward"] == 0.625 and metrics["train_mean_log_position"] == 1.625
    assert metrics["train_max_log_achievement_x"] == 1.0 and metrics["train_max_log_reward"] == 1.0
    assert metrics["train_max_log_position"] == 3.5  # the mean over dimensions of each one's maximum
    assert not any(key.startswith(("train_sum_", "train_mean_")) and key.endswith("achievement_x")
                   for key in metrics)  # a regex matches from the key's start, as re.match does


def test_default_logdir():
    config = configlib.build(["defaults"], {"task": "atari_breakout", "seed": 4})
    assert rundir.default_logdir(config) == Path("logdir") / "atari_breakout" / "seed4"
    assert rundir.default_logdir(config.update({"logdir": "~/runs/x"})) == Path.home() / "runs" / "x"


def test_resume_step_is_the_largest_of_checkpoint_episodes_and_logged_steps(tmp_path):
    episodes = tmp_path / "train_episodes"
    episodes.mkdir()
    for name in ("20240101T000000.000000-aa-51.npz", "20240101T000001.000000-bb-31.npz", "notes.txt"):
        (episodes / name).write_bytes(b"")
    assert rundir.resume_step(tmp_path, episodes, 0) == 80  # lengths minus the reset step
    assert rundir.resume_step(tmp_path, episodes, 120) == 120
    (tmp_path / "metrics.jsonl").write_text('{"step": 100}\n{"step": 150}\n{"step": 1')  # a cut last line
    with pytest.warns(UserWarning, match="not a complete JSON object"):
        assert rundir.resume_step(tmp_path, episodes, 120) == 150
        assert rundir.resume_step(tmp_path, None, 0) == 150  # offline: no episode files to count


def test_stop_turns_sigint_into_a_flag_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGINT)
    with Stop() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts at once
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous
    results = []
    thread = threading.Thread(target=lambda: results.append(Stop().__enter__().requested))
    thread.start()
    thread.join()
    assert results == [False]  # outside the main thread signals are left alone instead of failing


# ---- full size -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_atari_config_builds_and_completes_one_update(tmp_path):
    logdir = tmp_path / "atari"
    # Episodes just longer than the 50-step training sequences; steps == prefill, so only the pretrain update.
    result = run([sys.executable, str(TRAIN_SCRIPT), "--configs", "defaults", "atari", "--task", "atari_pong",
                  "--logdir", str(logdir), "--time_limit", "60", "--prefill", "60", "--steps", "60",
                  "--eval_eps", "0"], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = {name: int(count.replace(",", "")) for name, count in
              re.findall(r"(world_model|actor|critic) ([\d,]+)", result.stdout)}
    assert 15e6 < counts["world_model"] < 25e6 and 0.5e6 < counts["actor"] < 2e6
    import tensorflow as tf

    values = checkpoint_values(tf.train.latest_checkpoint(str(logdir / "checkpoints")))
    assert int(values["agent/step/.ATTRIBUTES/VARIABLE_VALUE"]) == 1


def test_from_checkpoint_of_another_architecture_exits_2(pong_run, tmp_path):
    result = run(train_cmd(tmp_path / "run", "--from_checkpoint", str(pong_run[0]), "--rssm.deter", "24"),
                 timeout=120)
    assert result.returncode == 2
    line = error_line(result)
    assert "does not hold the weights of this agent" in line
    assert not (tmp_path / "run" / "checkpoints").exists()
