"""Our Atari env against gymnasium's own AtariPreprocessing, and the rule for when a reset starts a game.

The reference is built here independently of `envs.atari`: ALE v5 with one frame per
call and no sticky actions, wrapped in AtariPreprocessing without no-ops. With the same
actions, ours must give the same observations, rewards and terminal flags at every step,
across time-limit cuts (where the reference is simply reset) and game overs.
"""

import cv2
import gymnasium
import numpy as np
import pytest
from gymnasium.wrappers import AtariPreprocessing

from dreamerv2_tf.envs import make_env
from dreamerv2_tf.envs.atari import ale_name

QUIET = {"sticky": False, "noops": 0}  # no randomness: the actions decide everything


def reference_env(game, grayscale=True, all_actions=True, size=64):
    import ale_py

    gymnasium.register_envs(ale_py)
    inner = gymnasium.make(f"ALE/{ale_name(game)}-v5", frameskip=1, repeat_action_probability=0.0,
                           full_action_space=all_actions, max_num_frames_per_episode=0)
    return AtariPreprocessing(inner, noop_max=0, frame_skip=4, screen_size=size,
                              terminal_on_life_loss=False, grayscale_obs=grayscale, grayscale_newaxis=True)


def actions_for(env, steps, seed=0):
    return np.random.default_rng(seed).integers(env.act_space["action"].n, size=steps)


def step(env, index):
    return env.step({"action": np.eye(env.act_space["action"].n, dtype=np.float32)[index]})


@pytest.mark.parametrize("game, time_limit, steps, grayscale, all_actions, cuts, game_overs", [
    ("pong", 40, 130, True, True, 3, 0),
    ("breakout", 170, 460, True, True, 1, 2),  # random play: games end after 120-200 steps
    ("space_invaders", 40, 130, False, False, 3, 0),  # RGB, minimal action set, flickering sprites
])
def test_matches_gymnasium_atari_preprocessing(game, time_limit, steps, grayscale, all_actions,
                                               cuts, game_overs):
    ours = make_env(f"atari_{game}", seed=7, action_repeat=4, time_limit=time_limit,
                    atari={**QUIET, "grayscale": grayscale, "all_actions": all_actions})
    reference = reference_env(game, grayscale, all_actions)
    ended = {"cut": 0, "game_over": 0}
    try:
        assert ours.act_space["action"].n == reference.action_space.n
        expected, _ = reference.reset(seed=7)
        obs = ours.reset()
        np.testing.assert_array_equal(obs["image"], expected)
        length = 0
        for t, index in enumerate(actions_for(ours, steps)):
            obs = step(ours, index)
            expected, reward, terminated, truncated, _ = reference.step(int(index))
            length += 1
            np.testing.assert_array_equal(obs["image"], expected, err_msg=f"step {t}")
            assert obs["reward"] == reward, t
            assert bool(obs["is_terminal"]) == terminated, t
            assert not truncated  # neither side has a frame cap: only our TimeLimit cuts
            assert bool(obs["is_last"]) == (terminated or length == time_limit), t
            if obs["is_last"]:
                ended["game_over" if terminated else "cut"] += 1
                length = 0
                expected, _ = reference.reset()
                np.testing.assert_array_equal(ours.reset()["image"], expected, err_msg=f"reset after {t}")
    finally:
        ours.close()
        reference.close()
    # The comparison went through the boundaries it is meant to check.
    assert ended["cut"] >= cuts and ended["game_over"] >= game_overs, ended


def run_episode(env, actions):
    """The frames of one episode from reset under `actions` (stopping early at its end)."""
    frames = [env.reset()["image"]]
    for index in actions:
        obs = step(env, index)
        frames.append(obs["image"])
        if obs["is_last"]:
            break
    return np.stack(frames), obs


def test_time_limit_cut_starts_a_new_game():
    env = make_env("atari_pong", action_repeat=4, time_limit=30, atari=QUIET)
    actions = actions_for(env, 30)
    try:
        first, end = run_episode(env, actions)
        assert end["is_last"] and not end["is_terminal"] and len(first) == 31
        assert not np.array_equal(first[-1], first[0])  # the game moved on before the cut
        second, _ = run_episode(env, actions)
        assert env.ale.getEpisodeFrameNumber() == 30 * 4  # counted from a new game's first frame
    finally:
        env.close()
    # Same actions from a new game: the same episode again, starting from the game's first frame.
    np.testing.assert_array_equal(second, first)


def test_reset_in_the_middle_of_an_episode_starts_a_new_game():
    env = make_env("atari_pong", action_repeat=4, atari=QUIET)
    try:
        fresh = env.reset()["image"]
        for index in actions_for(env, 25):
            moved = step(env, index)["image"]
        assert not np.array_equal(moved, fresh)
        np.testing.assert_array_equal(env.reset()["image"], fresh)  # as a driver reset does
        assert env.ale.getEpisodeFrameNumber() == 0
    finally:
        env.close()


def test_new_game_after_game_over_and_after_cut_with_lives():
    env = make_env("atari_breakout", action_repeat=4, time_limit=10, atari={**QUIET, "lives": True})
    try:
        fresh = env.reset()["image"]
        _, end = run_episode(env, actions_for(env, 10))
        assert end["is_last"] and not end["is_terminal"]  # a cut before any life is lost
        assert env.ale.lives() == 5
        np.testing.assert_array_equal(env.reset()["image"], fresh)
        assert env.ale.getEpisodeFrameNumber() == 0
    finally:
        env.close()
    env = make_env("atari_breakout", action_repeat=4, atari=QUIET)
    try:
        fresh = env.reset()["image"]
        _, end = run_episode(env, actions_for(env, 1000))
        assert end["is_terminal"] and env.ale.game_over()
        np.testing.assert_array_equal(env.reset()["image"], fresh)
        assert env.ale.lives() == 5 and env.ale.getEpisodeFrameNumber() == 0
    finally:
        env.close()


def test_lives_life_loss_continues_the_game():
    # No-ops are on: a new game would show them, a continued one must not.
    env = make_env("atari_breakout", seed=3, action_repeat=4,
                   atari={"sticky": False, "noops": 30, "lives": True})
    actions = iter(actions_for(env, 3000))
    continued = 0
    try:
        fresh = env.reset()["image"]
        assert 1 <= env.ale.getEpisodeFrameNumber() <= 30
        lives = env.ale.lives()
        while True:
            obs = step(env, next(actions))
            if not obs["is_last"]:
                continue
            assert obs["is_terminal"]
            if env.ale.game_over():
                break
            assert env.ale.lives() == lives - 1  # one life lost, the game goes on
            frame_number = env.ale.getEpisodeFrameNumber()
            first = env.reset()
            assert first["is_first"] and first["reward"] == 0
            assert env.ale.getEpisodeFrameNumber() == frame_number  # no new game, no no-ops
            assert env.ale.lives() == lives - 1
            # The first observation of the new episode is the current screen.
            screen = cv2.resize(env.ale.getScreenGrayscale(), (64, 64), interpolation=cv2.INTER_AREA)
            np.testing.assert_array_equal(first["image"], screen[:, :, None])
            assert not np.array_equal(first["image"], fresh)
            lives -= 1
            continued += 1
        assert continued == 4  # Breakout's five lives: four continuations, then the game is over
        env.reset()
        assert env.ale.lives() == 5 and 1 <= env.ale.getEpisodeFrameNumber() <= 30
    finally:
        env.close()
