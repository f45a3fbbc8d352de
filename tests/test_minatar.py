"""MinAtar: the env on the real games, a smoke run of the `minatar` config, and the opt-in learning run."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gymnasium import spaces

from dreamerv2_tf.envs import make_env
from dreamerv2_tf.envs.minatar import GAMES
from dreamerv2_tf.loop.driver import random_policy
from dreamerv2_tf.loop.episodes import load_episode
from dreamerv2_tf.loop.logger import read_metrics

ROOT = Path(__file__).resolve().parent.parent
CHANNELS = {"asterix": 4, "breakout": 4, "freeway": 7, "seaquest": 10, "space_invaders": 6}
BREAKOUT_LEFT, BREAKOUT_NOOP = 1, 0  # MinAtar's action indices ('n', 'l', 'u', 'r', 'd', 'f')
PADDLE = 0  # Breakout's paddle channel


def play(env, actions):
    observations = [env.reset()]
    for index in actions:
        if observations[-1]["is_last"]:
            observations.append(env.reset())
        observations.append(env.step({"action": np.eye(env.act_space["action"].n, dtype=np.float32)[index]}))
    return observations


def random_episode(env, seed=0, limit=5000):
    policy = random_policy(env.act_space, 1, seed)
    observations = [env.reset()]
    while not observations[-1]["is_last"] and len(observations) < limit:
        action, _ = policy({"is_first": np.zeros(1, bool)}, None)
        observations.append(env.step({"action": action["action"][0]}))
    return observations


@pytest.mark.parametrize("game", GAMES)
def test_spaces_and_observations_at_the_native_grid(game):
    env = make_env(f"minatar_{game}", size=(10, 10))
    assert env.obs_space["image"] == spaces.Box(0, 255, (10, 10, CHANNELS[game]), np.uint8)
    assert env.act_space["action"] == spaces.Discrete(6)
    first = env.reset()
    assert first["is_first"] and not first["is_last"] and first["reward"] == 0
    assert first["image"].shape == (10, 10, CHANNELS[game]) and first["image"].dtype == np.uint8
    assert set(np.unique(first["image"])) <= {0, 255} and first["image"].any()


def test_minimal_action_set_and_enlarged_frames_keep_cells_solid():
    env = make_env("minatar_breakout", size=(20, 30), minatar={"all_actions": False})
    assert env.act_space["action"] == spaces.Discrete(3)
    image = env.reset()["image"]
    assert image.shape == (20, 30, 4)
    native = make_env("minatar_breakout", size=(10, 10)).reset()["image"]
    # Each cell becomes a 2 x 3 block of its value (nearest neighbour, no blending).
    np.testing.assert_array_equal(image, np.repeat(np.repeat(native, 2, 0), 3, 1))


def test_same_seed_same_episode_other_seed_other_episode():
    actions = np.random.default_rng(0).integers(0, 6, 300)
    runs = [play(make_env("minatar_space_invaders", seed=seed, size=(10, 10)), actions) for seed in (3, 3, 4)]
    frames = [np.stack([obs["image"] for obs in run]) for run in runs]
    np.testing.assert_array_equal(frames[0], frames[1])
    assert not np.array_equal(frames[0], frames[2])


def test_breakout_ends_in_a_terminal_state_and_freeway_by_time():
    breakout = random_episode(make_env("minatar_breakout", size=(10, 10)))
    assert breakout[-1]["is_last"] and breakout[-1]["is_terminal"]
    assert not any(obs["is_last"] or obs["is_terminal"] for obs in breakout[:-1])
    freeway = random_episode(make_env("minatar_freeway", size=(10, 10)))
    assert len(freeway) == 2501 + 1  # 2,500 steps and the step at which the timer runs out, plus the reset
    assert freeway[-1]["is_last"] and not freeway[-1]["is_terminal"]


@pytest.mark.parametrize("sticky, moves", [(0.0, True), (1.0, False)])
def test_sticky_actions_repeat_the_previous_action(sticky, moves):
    # With probability 1 every step repeats the previous action, the no-op the game starts with, so pressing
    # left never moves the paddle; with probability 0 it moves at once.
    env = make_env("minatar_breakout", size=(10, 10), seed=0, minatar={"sticky": sticky})
    observations = play(env, [BREAKOUT_LEFT] * 3)
    start, end = (np.argwhere(obs["image"][..., PADDLE])[0, 1] for obs in (observations[0], observations[-1]))
    assert (end < start) == moves, (start, end)


def test_bad_game_and_options_give_one_line_errors():
    with pytest.raises(ValueError, match="did you mean minatar_breakout") as info:
        make_env("minatar_breakuot")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="valid options: sticky, all_actions, ramping"):
        make_env("minatar_breakout", minatar={"stiky": 0.1})
    with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
        make_env("minatar_breakout", minatar={"sticky": 1.5})


def train(logdir, *flags, timeout=600):
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--configs", "defaults", "minatar", *flags,
               "--logdir", str(logdir)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_minatar_config_trains_a_few_updates_with_videos(tmp_path):
    # The real `minatar` model (10x10 CNN, 32 x 32 latents) on Breakout, with the run lengths cut short.
    logdir = tmp_path / "breakout"
    result = train(logdir, "--steps", "300", "--prefill", "200", "--pretrain", "1", "--train_every", "50",
                   "--eval_every", "300", "--eval_eps", "1", "--log_every", "100", "--checkpoint_every", "300")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_metrics(logdir)
    assert any(np.isfinite(row.get("model_loss", np.nan)) for row in rows)
    assert any(row.get("eval_return") is not None for row in rows)
    episode = load_episode(next((logdir / "train_episodes").glob("*.npz")))
    assert episode["image"].shape[1:] == (10, 10, 4) and episode["action"].shape[1:] == (6,)
    assert list((logdir / "videos").glob("openl_image_*.gif"))


RANDOM_BREAKOUT = 0.5  # MinAtar's README: uniform random actions, 1,000 episodes (our measurement: 0.50 +- 0.04)


@pytest.mark.slow
def test_breakout_learns_beyond_random(tmp_path):
    # The learning run of docs/learning_checks.md (about 100 minutes on 2 cores): its evaluations at
    # 32,500, 37,500 and 42,500 agent steps returned 0.6, 2.3 and 2.2.
    logdir = tmp_path / "breakout"
    result = train(logdir, "--steps", "43000", timeout=3 * 3600)
    assert result.returncode == 0, result.stderr[-2000:]
    returns = [row["eval_return"] for row in read_metrics(logdir) if row.get("eval_return") is not None]
    assert returns[0] < 4 * RANDOM_BREAKOUT  # right after prefill, before learning
    assert max(returns[-3:]) > 3 * RANDOM_BREAKOUT, returns
