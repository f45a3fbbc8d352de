"""Open-loop prediction tool (scripts/openloop.py): files, pixel layout, error numbers, determinism, errors.

The run is built in-process, the way training leaves it: config.yaml, episodes of random 64x64 grayscale
frames in train_episodes/ and a checkpoint of a tiny agent. Random frames make every window unique, so
matching the PNG against an episode shows which frames the tool really drew.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
from helpers import discrete_actions, make_agent, obs_space, tiny_config

from dreamerv2_tf import config as configlib
from dreamerv2_tf.loop.episodes import load_episode, save_episode
from dreamerv2_tf.tools import balltrack as bt
from dreamerv2_tf.tools import openloop as ol

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "openloop.py"
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
ACTIONS = 3
LENGTHS = (30, 24, 9, 40)  # the 9-step episode is too short for the windows below and must never be drawn
CONTEXT, LENGTH, COUNT, EVERY = 4, 12, 2, 3


def make_episode(length: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    steps = np.arange(length)
    action = np.eye(ACTIONS, dtype=np.float32)[rng.integers(0, ACTIONS, length)]
    action[0] = 0
    return {
        "image": rng.integers(0, 256, (length, 64, 64, 1), dtype=np.uint8),
        "action": action,
        "reward": rng.normal(size=length).astype(np.float32),
        "is_first": steps == 0, "is_last": steps == length - 1, "is_terminal": np.zeros(length, bool),
        "log_score": np.zeros(length, np.float32),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(logdir, agent): a run whose checkpoint holds the agent's weights."""
    import tensorflow as tf

    from dreamerv2_tf.loop.checkpoint import Checkpointer

    logdir = tmp_path_factory.mktemp("openloop") / "run"
    (logdir / "train_episodes").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for length in LENGTHS:
        save_episode(logdir / "train_episodes", make_episode(length, rng))
    tiny_config({"logdir": str(logdir)}).save(logdir / "config.yaml")
    agent = make_agent(obs_space((64, 64, 1)), discrete_actions(ACTIONS), seed=3)
    step = tf.Variable(0, dtype=tf.int64, trainable=False)
    Checkpointer(logdir / "checkpoints", 1, agent=agent, step=step).save(7)
    return logdir, agent


def script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=ENV, cwd=ROOT)


def error_line(result: subprocess.CompletedProcess) -> str:
    """stderr of a failed run: one 'error:' line, apart from TensorFlow's start-up chatter."""
    noise = re.compile(r"^(WARNING: All log messages before absl|[IWE]\d{4} )")
    lines = [line for line in result.stderr.splitlines() if line.strip() and not noise.match(line)]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def upscaled(frame: np.ndarray, scale: int) -> np.ndarray:
    rgb = np.repeat(frame, 3, -1)
    return np.repeat(np.repeat(rgb, scale, 0), scale, 1)


# ---- the script end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli(run, tmp_path_factory):
    logdir, _ = run
    out = tmp_path_factory.mktemp("out")
    result = script("--logdir", str(logdir), "--context", str(CONTEXT), "--length", str(LENGTH), "--count",
                    str(COUNT), "--every", str(EVERY), "--seed", "5", "--png", str(out / "strip.png"),
                    "--video", str(out / "pred.gif"), "--error_row")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1  # exactly one JSON line
    return json.loads(lines[0]), out


def test_json_has_per_step_errors_of_model_and_baseline(cli):
    report, out = cli
    steps = LENGTH - CONTEXT
    assert report["steps"] == list(range(CONTEXT, LENGTH))
    for key in ("mse", "baseline_mse"):
        assert len(report[key]) == steps and all(math.isfinite(x) and x >= 0 for x in report[key])
    for key in ("mse_mean", "baseline_mse_mean", "recon_mse_mean"):
        assert math.isfinite(report[key])
    assert report["mse_mean"] == pytest.approx(np.mean(report["mse"]), rel=1e-4)
    # Independent random frames: repeating one of them misses by about 2 * Var(U[0, 1]) = 1/6.
    assert report["baseline_mse_mean"] == pytest.approx(1 / 6, rel=0.05)
    assert report["png"] == str(out / "strip.png") and report["video"] == str(out / "pred.gif")
    assert report["count"] == COUNT and len(report["sequences"]) == COUNT
    assert report["checkpoint"].endswith("ckpt-7")


def test_png_size_follows_count_length_and_every(cli):
    _, out = cli
    image = imageio.imread(out / "strip.png")
    columns = len(range(0, LENGTH, EVERY))
    cell = 64 * ol.PNG_SCALE
    rows = 3  # truth, model, |error|
    height = COUNT * (rows * cell + (rows - 1) * ol.GAP) + (COUNT - 1) * ol.SEQ_GAP
    width = columns * cell + (columns - 1) * ol.GAP
    m = ol.MARGINS
    assert image.shape[:2] == (height + m["top"] + m["bottom"], width + m["left"] + m["right"])


def test_png_truth_rows_are_the_episode_frames_and_the_boundary_is_marked(cli, run):
    report, out = cli
    logdir, _ = run
    image = imageio.imread(out / "strip.png")[..., :3]
    cell = 64 * ol.PNG_SCALE
    group = 3 * cell + 2 * ol.GAP + ol.SEQ_GAP
    for seq, source in enumerate(report["sequences"]):
        episode = load_episode(logdir / "train_episodes" / source["file"])
        assert len(episode["reward"]) >= LENGTH and 0 <= source["start"] <= len(episode["reward"]) - LENGTH
        for col, t in enumerate(range(0, LENGTH, EVERY)):
            y = ol.MARGINS["top"] + seq * group
            x = ol.MARGINS["left"] + col * (cell + ol.GAP)
            expected = upscaled(episode["image"][source["start"] + t], ol.PNG_SCALE)
            np.testing.assert_array_equal(image[y:y + cell, x:x + cell], expected)
    # A red line in the gap before the first imagined column (frame 6 with context 4 and every 3).
    gap_x = ol.MARGINS["left"] + 2 * cell + ol.GAP + ol.GAP // 2
    column = image[ol.MARGINS["top"]:ol.MARGINS["top"] + cell, gap_x - 1:gap_x + 1].reshape(-1, 3).astype(int)
    assert ((column[:, 0] > 150) & (column[:, 1] < 100)).mean() > 0.9
    other_gap = image[ol.MARGINS["top"]:ol.MARGINS["top"] + cell, ol.MARGINS["left"] + cell + 1]
    assert (other_gap == 255).all()  # the gap between two observed columns stays white


def test_video_has_a_frame_per_step_with_three_upscaled_panels_per_sequence(cli):
    _, out = cli
    frames = imageio.mimread(out / "pred.gif")
    scale = 3  # --scale default
    panel = 64 * scale + 2 * ol.VIDEO_BORDER
    assert len(frames) == LENGTH
    assert frames[0].shape[:2] == (ol.VIDEO_HEADER + COUNT * panel, 3 * panel)


def test_video_borders_turn_from_observed_to_open_loop_colour():
    truth = np.zeros((1, 6, 8, 8, 1), np.uint8)
    frames = ol.video_frames(ol.Prediction(truth, truth, context=2, sources=(("x", 0),)), scale=2)
    scale = ol.enlarged(2, 8, "video")  # 8 px frames are drawn larger than scale 2
    assert scale * 8 >= ol.MIN_FRAME_PX["video"] and frames.shape[2] >= 3 * scale * 8
    corner = (ol.VIDEO_HEADER + 1, 8 * scale + 2 * ol.VIDEO_BORDER + 1)  # top-left border of the model panel
    assert tuple(frames[1][corner]) == ol.CONTEXT_COLOR and tuple(frames[2][corner]) == ol.OPEN_LOOP_COLOR


# ---- in-process: the checkpoint, open loop and determinism ------------------------------------------------


def test_predictions_come_from_the_checkpoint_weights(run):
    import keras

    logdir, agent = run
    data, _ = ol.sample_sequences(logdir / "train_episodes", COUNT, LENGTH, seed=1)
    wm, checkpoint = ol.load_world_model(logdir, configlib.load_run(logdir), data)
    assert checkpoint.endswith("ckpt-7")
    for ours, theirs in zip(wm.variables_to_train, agent.wm.variables_to_train, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    truth, model = ol.predict(wm, data, "image", CONTEXT, seed=2)
    np.testing.assert_array_equal(truth, data["image"])
    keras.utils.set_random_seed(2)
    video = agent.wm.video_pred(data, "image", CONTEXT, count=COUNT).numpy()
    expected = np.round(np.clip(video[:, :, 64:128], 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(model, expected)


def test_checkpoints_that_do_not_fit_the_model_are_refused(run, tmp_path):
    import tensorflow as tf

    logdir, _ = run
    data, _ = ol.sample_sequences(logdir / "train_episodes", 1, LENGTH, seed=0)
    wider = configlib.load_run(logdir).update({"rssm.deter": 48})  # the checkpoint's GRU has 32 units
    with pytest.raises(ValueError, match="does not fit the world model"):
        ol.load_world_model(logdir, wider, data)
    empty = tmp_path / "empty"
    tf.train.Checkpoint(agent=tf.Module()).save(str(empty / "checkpoints" / "ckpt"))
    with pytest.raises(ValueError, match="does not fit the world model.*does not hold the weights"):
        ol.load_world_model(empty, configlib.load_run(logdir), data)


def test_open_loop_frames_ignore_the_observations_they_predict(run):
    logdir, _ = run
    data, _ = ol.sample_sequences(logdir / "train_episodes", COUNT, LENGTH, seed=1)
    wm, _ = ol.load_world_model(logdir, configlib.load_run(logdir), data)
    _, model = ol.predict(wm, data, "image", CONTEXT, seed=4)
    changed = {**data, "image": data["image"].copy()}
    changed["image"][:, CONTEXT:] = 255 - changed["image"][:, CONTEXT:]
    _, again = ol.predict(wm, changed, "image", CONTEXT, seed=4)
    np.testing.assert_array_equal(model, again)
    # ... while the observed part does feed the model.
    changed["image"][:, :CONTEXT] = 0
    _, other = ol.predict(wm, changed, "image", CONTEXT, seed=4)
    assert not np.array_equal(other, model)


def test_same_seed_same_output_other_seed_other_sequences(run, tmp_path):
    logdir, _ = run
    kwargs = dict(context=CONTEXT, length=LENGTH, count=COUNT, every=EVERY)
    first = ol.openloop(logdir, seed=3, png=tmp_path / "a.png", video=tmp_path / "a.gif", **kwargs)
    second = ol.openloop(logdir, seed=3, png=tmp_path / "b.png", video=tmp_path / "b.gif", **kwargs)
    other = ol.openloop(logdir, seed=4, png=tmp_path / "c.png", video=tmp_path / "c.gif", **kwargs)
    strip = lambda report: {k: v for k, v in report.items() if k not in ("png", "video")}  # noqa: E731
    assert strip(first) == strip(second)
    np.testing.assert_array_equal(imageio.imread(tmp_path / "a.png"), imageio.imread(tmp_path / "b.png"))
    np.testing.assert_array_equal(np.stack(imageio.mimread(tmp_path / "a.gif")),
                                  np.stack(imageio.mimread(tmp_path / "b.gif")))
    assert other["sequences"] != first["sequences"]
    # Two rows per sequence without --error_row.
    cell = 64 * ol.PNG_SCALE
    height = COUNT * (2 * cell + ol.GAP) + (COUNT - 1) * ol.SEQ_GAP + ol.MARGINS["top"] + ol.MARGINS["bottom"]
    assert imageio.imread(tmp_path / "a.png").shape[0] == height


def test_sampling_draws_whole_windows_from_long_enough_episodes(run):
    logdir, _ = run
    data, sources = ol.sample_sequences(logdir / "train_episodes", 6, 20, seed=0)
    assert data["image"].shape == (6, 20, 64, 64, 1) and data["action"].shape == (6, 20, ACTIONS)
    assert "log_score" not in data and data["is_first"][:, 0].all() and not data["is_first"][:, 1:].any()
    for (name, start), images in zip(sources, data["image"], strict=True):
        episode = load_episode(logdir / "train_episodes" / name)
        assert len(episode["reward"]) >= 20  # never the 9-step episode
        np.testing.assert_array_equal(images, episode["image"][start:start + 20])
    with pytest.raises(ValueError, match="no episode .* has 41 steps"):
        ol.sample_sequences(logdir / "train_episodes", 1, 41, seed=0)


def test_errors_of_model_and_copy_baseline():
    truth = np.zeros((2, 4, 2, 2, 1), np.uint8)
    truth[:, 2:] = 255  # the scene changes right after the context of 2 frames
    model = truth.copy()
    model[0, 3] = 0  # one wrong frame of one sequence: error 1 there, averaged over 2 sequences
    result = ol.errors(truth, model, context=2)
    assert result["steps"] == [2, 3] and result["mse"] == [0.0, 0.5] and result["mse_mean"] == 0.25
    assert result["baseline_mse"] == [1.0, 1.0] and result["recon_mse_mean"] == 0.0


# ---- user errors: one line, exit code 2 -------------------------------------------------------------------


def test_missing_logdir_exits_2(tmp_path):
    assert "does not exist" in error_line(script("--logdir", str(tmp_path / "nope")))


def test_logdir_without_config_exits_2(tmp_path):
    assert "no config.yaml" in error_line(script("--logdir", str(tmp_path)))


def test_missing_checkpoint_exits_2(run, tmp_path):
    logdir, _ = run
    (tmp_path / "config.yaml").write_text((logdir / "config.yaml").read_text())
    assert "no checkpoint in" in error_line(script("--logdir", str(tmp_path)))
    (tmp_path / "checkpoints").mkdir()
    result = script("--logdir", str(tmp_path), "--episodes", str(logdir / "train_episodes"), "--length", "10")
    assert "no checkpoint in" in error_line(result)


def test_unknown_key_bad_numbers_and_suffixes_exit_2(run):
    logdir, _ = run
    line = error_line(script("--logdir", str(logdir), "--key", "rgb", "--length", "10"))
    assert "--key 'rgb'" in line and "choices: image" in line
    line = error_line(script("--logdir", str(logdir), "--length", "5"))
    assert "--length (5) must exceed --context (5)" in line
    assert "has 100 steps" in error_line(script("--logdir", str(logdir), "--length", "100"))
    line = error_line(script("--logdir", str(logdir), "--video", "x.avi"))
    assert "--video must end in .gif or .mp4" in line
    assert "--count must be at least 1" in error_line(script("--logdir", str(logdir), "--count", "0"))


# ---- --track pong: the ball tracker's report ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pong_episodes(tmp_path_factory) -> Path:
    """Episodes of synthetic Pong frames for --episodes: the court's levels and walls, and a one-pixel ball
    that moves one column per step (the actions and rewards are random, as in make_episode)."""
    directory = tmp_path_factory.mktemp("pong_episodes")
    rng = np.random.default_rng(1)
    for length in (30, 24, 28):
        episode = make_episode(length, rng)
        images = np.full((length, 64, 64, 1), 87, np.uint8)
        images[:, 7:11], images[:, 59:] = 236, 236
        row, col = rng.integers(15, 50), rng.integers(12, 20)
        images[np.arange(length), row, col + np.arange(length)] = 236
        episode["image"] = images
        save_episode(directory, episode)
    return directory


def test_track_pong_reports_the_ball_per_imagined_step(run, pong_episodes, tmp_path):
    logdir, _ = run
    out = tmp_path / "report" / "track.json"
    result = script("--logdir", str(logdir), "--episodes", str(pong_episodes), "--context", str(CONTEXT),
                    "--length", str(LENGTH), "--count", "3", "--show", "1", "--seed", "2", "--png",
                    str(tmp_path / "strip.png"), "--video", str(tmp_path / "pred.gif"), "--track", "pong",
                    "--track_out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # still one JSON line; the table went to stderr
    saved = json.loads(out.read_text())
    assert report["track"] == saved and report["track_out"] == str(out)
    steps = LENGTH - CONTEXT
    assert saved["steps"] == list(range(1, steps + 1)) and saved["n"] == [3] * steps
    assert saved["count"] == 3 and saved["context"] == CONTEXT and saved["checkpoint"].endswith("ckpt-7")
    # Repeating the last observed frame misses the ball by k pixels at step k: hits up to 2 pixels.
    assert saved["baseline_distance"] == [float(k) for k in range(1, steps + 1)]
    assert saved["baseline_hit"] == [1.0, 1.0] + [0.0] * (steps - 2)
    # The model's numbers are those of its predictions of the same sequences.
    data, _ = ol.sample_sequences(pong_episodes, 3, LENGTH, seed=2)
    wm, _ = ol.load_world_model(logdir, configlib.load_run(logdir), data)
    truth, model = ol.predict(wm, data, "image", CONTEXT, seed=2)
    expected = bt.openloop_report(truth, model, CONTEXT)
    assert {name: saved[name] for name in expected} == expected
    lines = result.stderr.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["k", "n"])
    rows = [line.split() for line in lines[header + 1:header + 1 + steps]]
    assert [row[:2] for row in rows] == [[str(k), "3"] for k in range(1, steps + 1)]
    # --show 1: the strip and the video show the first sequence only, the numbers are over all 3.
    cell = 64 * ol.PNG_SCALE
    height = 2 * cell + ol.GAP + ol.MARGINS["top"] + ol.MARGINS["bottom"]
    assert imageio.imread(tmp_path / "strip.png").shape[0] == height
    assert imageio.mimread(tmp_path / "pred.gif")[0].shape[0] == ol.VIDEO_HEADER + 64 * 3 + 2 * ol.VIDEO_BORDER
    assert len(report["sequences"]) == 3 and len(report["mse"]) == steps


def test_track_pong_refuses_what_it_cannot_read(run, tmp_path):
    logdir, _ = run
    rng = np.random.default_rng(0)
    episode = make_episode(20, rng)
    episode["image"] = rng.integers(0, 256, (20, 64, 64, 3), dtype=np.uint8)
    (tmp_path / "rgb").mkdir()
    save_episode(tmp_path / "rgb", episode)
    line = error_line(script("--logdir", str(logdir), "--episodes", str(tmp_path / "rgb"), "--length", "10",
                             "--track", "pong"))
    assert "--track pong needs 64x64 grayscale frames (64x64x1); --key 'image' has 64x64x3" in line
    line = error_line(script("--logdir", str(logdir), "--track", "tennis"))
    assert "--track" in line and "invalid choice: 'tennis'" in line
    assert "--show must be at least 1" in error_line(script("--logdir", str(logdir), "--show", "0"))
    other = tmp_path / "breakout"
    other.mkdir()
    config = configlib.load_run(logdir).update({"task": "atari_breakout"})
    config.save(other / "config.yaml")
    (other / "checkpoints").symlink_to(logdir / "checkpoints")
    line = error_line(script("--logdir", str(other), "--episodes", str(logdir / "train_episodes"), "--length", "10",
                             "--track", "pong"))
    assert "--track pong needs a run on atari_pong, this run's task is atari_breakout" in line


@pytest.mark.slow
def test_real_pong_run(tmp_path):
    """scripts/train.py on ALE Pong with the debug config, then the tool on its episodes (about a minute)."""
    logdir = tmp_path / "pong"
    train = [sys.executable, str(ROOT / "scripts" / "train.py"), "--configs", "defaults", "debug", "--task",
             "atari_pong", "--time_limit", "60", "--action_repeat", "4", "--prefill", "100", "--steps", "200",
             "--eval_every", "1000", "--logdir", str(logdir)]
    result = subprocess.run(train, capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    result = script("--logdir", str(logdir), "--video", str(tmp_path / "pong.mp4"), "--length", "40",
                    "--track", "pong")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert len(report["mse"]) == 35 and Path(report["png"]).exists()
    # Real frames: the tracker sees the true ball in some of them, and repeating a frame keeps the ball.
    track = json.loads((logdir / "track_pong.json").read_text())
    assert track["steps"] == list(range(1, 36)) and sum(track["n"]) > 0 and track["baseline_distance"][0] is not None
    assert len(imageio.mimread(tmp_path / "pong.mp4")) == 40


def test_object_channel_frames_are_drawn_with_every_channel_in_its_own_colour():
    frames = np.zeros((2, 10, 10, 4), np.uint8)
    frames[:, 1, 2, 3] = 255  # only the fourth channel (MinAtar Breakout's bricks)
    frames[:, 5, 5, 0] = 255
    rgb = ol._rgb(frames, 2)
    assert rgb.shape == (2, 20, 20, 3)
    assert rgb[0, 2:4, 4:6].any() and rgb[0, 10:12, 10:12].any() and not rgb[0, 0, 0].any()
    assert not np.array_equal(rgb[0, 2, 4], rgb[0, 10, 10])
