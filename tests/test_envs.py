"""Environments on real emulators and simulators (tiny budgets, no mocks)."""

import importlib.util

import numpy as np
import pytest
from gymnasium import spaces

from dreamerv2_tf.envs import base, make_env, make_envs
from dreamerv2_tf.envs.atari import GAMES, STICKY_PROB
from dreamerv2_tf.loop.driver import random_policy

FLAG_DTYPES = {"reward": np.float32, "is_first": np.bool_, "is_last": np.bool_, "is_terminal": np.bool_}


def check_obs(env, obs):
    assert set(obs) == set(env.obs_space)
    for key, space in env.obs_space.items():
        value = np.asarray(obs[key])
        assert value.shape == space.shape, key
        assert value.dtype == space.dtype, key
    for key, dtype in FLAG_DTYPES.items():
        assert np.asarray(obs[key]).dtype == dtype


def run_random(env, steps, seed=0, stop_at_end=False):
    """Step with random actions; returns the list of observations (resetting at episode ends)."""
    policy = random_policy(env.act_space, 1, seed)
    observations = [env.reset()]
    for _ in range(steps):
        if observations[-1]["is_last"]:
            if stop_at_end:
                break
            observations.append(env.reset())
        action, _ = policy({"is_first": np.zeros(1, bool)}, None)
        observations.append(env.step({"action": action["action"][0]}))
    return observations


# ---- Atari ------------------------------------------------------------------------------------


def test_atari_pong_protocol_spaces():
    env = make_env("atari_pong", action_repeat=4)
    try:
        assert env.act_space["action"] == spaces.Discrete(18)
        assert env.obs_space["image"].shape == (64, 64, 1)
        first = env.reset()
        check_obs(env, first)
        assert first["is_first"] and not first["is_last"] and first["reward"] == 0
        obs = env.step({"action": np.eye(18, dtype=np.float32)[3]})
        check_obs(env, obs)
        assert not obs["is_first"]
        assert obs["image"].std() > 0  # a real rendered frame, not a blank buffer
    finally:
        env.close()


def test_atari_ram_is_the_emulators_memory_after_each_step():
    env = make_env("atari_pong", action_repeat=4, atari={"ram": True})
    try:
        assert env.obs_space["ram"] == spaces.Box(0, 255, (128,), np.uint8)
        observations = run_random(env, 60)
        for obs in observations[:3]:
            check_obs(env, obs)
        np.testing.assert_array_equal(observations[-1]["ram"], env.ale.getRAM())
        rams = np.stack([obs["ram"] for obs in observations])
        assert len({row.tobytes() for row in rams}) > 30  # it changes as the game goes on
    finally:
        env.close()
    assert "ram" not in make_env("atari_pong").obs_space  # off by default


def test_atari_options_rgb_minimal_actions():
    env = make_env("atari_pong", action_repeat=4, size=(48, 40), atari={"grayscale": False, "all_actions": False})
    try:
        assert env.act_space["action"] == spaces.Discrete(6)  # Pong's minimal action set
        obs = env.reset()
        assert obs["image"].shape == (48, 40, 3) and obs["image"].dtype == np.uint8
        assert env.step({"action": np.eye(6)[1]})["image"].shape == (48, 40, 3)
    finally:
        env.close()


def atari_images(seed, steps=150, action_seed=0, **atari):
    """Pong frames under a fixed random action sequence (resetting at episode ends)."""
    env = make_env("atari_pong", seed=seed, action_repeat=4, atari=atari)
    actions = np.random.default_rng(action_seed).integers(18, size=steps)
    frames = [env.reset()["image"]]
    for action in actions:
        obs = env.step({"action": np.eye(18)[action]})
        frames.append(obs["image"])
        if obs["is_last"]:
            frames.append(env.reset()["image"])
    env.close()
    return np.stack(frames)


def test_atari_sticky_option_sets_ale_stickiness():
    for sticky, prob in [(True, STICKY_PROB), (False, 0.0)]:
        env = make_env("atari_pong", atari={"sticky": sticky})
        assert env.ale.getFloat("repeat_action_probability") == pytest.approx(prob)
        env.close()
    assert STICKY_PROB == 0.25  # Machado et al. (2018), the paper's protocol


def test_atari_sticky_actions_change_what_the_actions_do():
    sticky = atari_images(3, sticky=True)
    plain = atari_images(3, sticky=False)
    assert sticky.shape == plain.shape
    assert not np.array_equal(sticky, plain)  # some chosen actions were delayed by a frame
    np.testing.assert_array_equal(sticky, atari_images(3, sticky=True))  # same seed, same game
    assert not np.array_equal(sticky, atari_images(4, sticky=True))  # the stickiness follows the seed


def test_atari_no_sticky_is_deterministic_given_actions():
    # Without sticky actions and no-ops, the seed does not matter: the actions decide everything.
    np.testing.assert_array_equal(atari_images(1, sticky=False), atari_images(2, sticky=False))
    assert not np.array_equal(atari_images(1, sticky=False), atari_images(1, action_seed=1, sticky=False))


def test_atari_all_actions_vs_minimal_set():
    full = make_env("atari_pong", atari={"all_actions": True})
    minimal = make_env("atari_pong", atari={"all_actions": False})
    try:
        assert full.act_space["action"] == spaces.Discrete(18)
        assert len(set(full.action_meanings)) == 18 and full.action_meanings[0] == "NOOP"
        assert minimal.action_meanings == ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]
        # Index 2 is UP in the full set but RIGHT in Pong's minimal set: the sets really differ.
        assert full.action_meanings[2] == "UP"
    finally:
        full.close()
        minimal.close()


def test_atari_noops_at_reset_vary_with_seed_and_stay_within_bound():
    counts = {}
    for seed in range(4):
        env = make_env("atari_pong", seed=seed, action_repeat=4, time_limit=3,
                       atari={"noops": 30, "sticky": False})
        counts[seed] = []
        for _ in range(4):  # the first game and three more after time-limit cuts
            env.reset()
            counts[seed].append(env.ale.getEpisodeFrameNumber())  # frames played since the game began
            for _ in range(3):
                env.step({"action": np.eye(18)[0]})
        env.close()
    values = [count for seed_counts in counts.values() for count in seed_counts]
    assert all(1 <= count <= 30 for count in values), counts
    assert len(set(values)) > 4  # random, not a fixed number of no-ops
    assert len({tuple(seed_counts) for seed_counts in counts.values()}) == len(counts)  # per seed
    env = make_env("atari_pong", seed=0, action_repeat=4, atari={"noops": 30, "sticky": False})
    env.reset()
    assert env.ale.getEpisodeFrameNumber() == counts[0][0]  # the same seed gives the same no-ops
    env.close()
    env = make_env("atari_pong", seed=0, action_repeat=4, atari={"noops": 0, "sticky": False})
    env.reset()
    assert env.ale.getEpisodeFrameNumber() == 0
    env.close()


def test_atari_max_pool_over_last_two_frames():
    # Full-size frames (no resize) so the pooled image can be compared pixel for pixel.
    kwargs = {"size": (210, 160), "atari": {"sticky": False}}
    pooled = make_env("atari_breakout", action_repeat=4, **kwargs)
    single = make_env("atari_breakout", action_repeat=1, **kwargs)
    pooled.reset()
    single.reset()
    actions = [1, 3, 4, 3, 1, 4, 4, 3]
    matched_flicker = False
    for action in actions:
        out = pooled.step({"action": np.eye(18)[action]})
        frames = [single.step({"action": np.eye(18)[action]})["image"] for _ in range(4)]
        expected = np.maximum(frames[2], frames[3])
        np.testing.assert_array_equal(out["image"], expected)
        matched_flicker |= not np.array_equal(frames[2], frames[3])
    assert matched_flicker  # the check above compared frames that actually differ
    pooled.close()
    single.close()


def test_atari_time_limit_truncates_without_terminal():
    env = make_env("atari_pong", action_repeat=4, time_limit=10)
    observations = run_random(env, 10)
    env.close()
    assert [bool(obs["is_last"]) for obs in observations] == [False] * 10 + [True]
    assert not any(obs["is_terminal"] for obs in observations)


def test_atari_game_over_is_terminal():
    env = make_env("atari_breakout", action_repeat=4)  # random play loses all lives in ~200 steps
    observations = run_random(env, 3000, stop_at_end=True)
    assert env.ale.game_over()
    env.close()
    ends = [index for index, obs in enumerate(observations) if obs["is_last"]]
    assert ends, "random Breakout play should end the game"
    first_end = observations[ends[0]]
    assert first_end["is_terminal"] and first_end["is_last"]
    assert not any(obs["is_terminal"] for obs in observations[: ends[0]])


def test_atari_lives_option_ends_episode_per_life():
    env = make_env("atari_breakout", action_repeat=4, atari={"lives": True})
    episodes = 0
    policy = random_policy(env.act_space, 1, 1)
    env.reset()
    while not env.ale.game_over():
        obs = env.step({"action": policy({"is_first": np.zeros(1)}, None)[0]["action"][0]})
        if obs["is_last"]:
            assert obs["is_terminal"]
            episodes += 1
            if not env.ale.game_over():
                assert env.reset()["is_first"]
    env.close()
    assert episodes == 5  # Breakout has five lives


def test_atari_same_seed_same_data_different_seed_differs():
    runs = []
    for seed in (5, 5, 6):
        env = make_env("atari_pong", seed=seed, action_repeat=4, time_limit=50)
        runs.append(np.stack([obs["image"] for obs in run_random(env, 150, seed=0)]))
        env.close()
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])  # sticky decisions come from the env seed


def test_unknown_atari_game_lists_close_names():
    with pytest.raises(ValueError, match="atari_pong") as info:
        make_env("atari_pongg")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="atari_james_bond"):
        make_env("atari_jamesbnd")


def test_paper_games_are_55_and_all_exist_in_ale():
    import ale_py
    import gymnasium

    gymnasium.register_envs(ale_py)
    assert len(GAMES) == 55
    missing = [name for name in GAMES.values() if f"ALE/{name}-v5" not in gymnasium.registry]
    assert not missing


@pytest.mark.parametrize("task, pattern", [
    ("atrai_pong", "atari_pong"),
    ("pong", "atari_pong"),
    ("foo", "tasks look like"),
    ("crafter_foo", "crafter_noreward"),
    ("gym_CartPol-v1", "gym_CartPole-v1"),
])
def test_bad_task_names_give_one_line_errors(task, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        make_env(task)
    assert "\n" not in str(info.value)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="valid options"):
        make_env("atari_pong", atari={"stiky": True})
    with pytest.raises(ValueError, match="train, eval"):
        make_env("atari_pong", mode="test")
    with pytest.raises(ValueError, match="none, thread, process"):
        make_envs("atari_pong", 2, parallel="threads")


# ---- Generic gymnasium ------------------------------------------------------------------------


def test_gym_cartpole_vector_obs_and_termination():
    env = make_env("gym_CartPole-v1")
    assert env.obs_space["vector"].shape == (4,) and env.obs_space["vector"].dtype == np.float32
    assert env.act_space["action"] == spaces.Discrete(2)
    observations = run_random(env, 200)
    for obs in observations:
        check_obs(env, obs)
    ends = [index for index, obs in enumerate(observations) if obs["is_last"]]
    assert ends and all(observations[index]["is_terminal"] for index in ends)  # it falls over: a real end
    assert sum(obs["reward"] for obs in observations[1:ends[0] + 1]) == ends[0]  # +1 per step alive
    env.close()


def test_gym_truncation_and_action_repeat():
    env = make_env("gym_CartPole-v1", time_limit=3, action_repeat=2)
    obs = env.reset()
    for _ in range(3):
        obs = env.step({"action": np.array([1.0, 0.0])})
    assert obs["is_last"] and not obs["is_terminal"]
    assert obs["reward"] == 2.0  # CartPole gives 1 per frame, summed over the two repeated frames
    env.close()


def test_gym_box_actions_are_rescaled():
    env = make_env("gym_Pendulum-v1")
    assert env.act_space["action"] == spaces.Box(-1, 1, (1,), np.float32)
    env.close()
    low, high = np.array([-2.0, 0.0, -np.inf]), np.array([2.0, 10.0, np.inf])
    scaled = base.rescale_action({"action": [1.0, -1.0, 7.0]}, low, high)
    np.testing.assert_allclose(scaled, [2.0, 0.0, 7.0])
    np.testing.assert_allclose(base.rescale_action({"action": [0.0, 0.5, 0.0]}, low, high)[:2], [0.0, 7.5])


# ---- DMC and Crafter --------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("dm_control") is None, reason="dm_control is not installed")
def test_dmc_walker_pixels_proprio_and_time_limit():
    env = make_env("dmc_walker_walk", action_repeat=8, size=(64, 64))
    try:
        assert env.obs_space["image"].shape == (64, 64, 3)
        assert env.act_space["action"] == spaces.Box(-1, 1, (6,), np.float32)
        vectors = [key for key, space in env.obs_space.items() if space.dtype == np.float32 and space.shape]
        assert {"orientations", "height", "velocity"} <= set(vectors)
        observations = run_random(env, 125)  # the suite's 1000 physics steps at action repeat 8
        for obs in observations[:3]:
            check_obs(env, obs)
        assert observations[0]["image"].std() > 0
        assert [bool(obs["is_last"]) for obs in observations] == [False] * 125 + [True]
        assert not observations[-1]["is_terminal"]  # suite episodes end by time limit
        assert sum(obs["reward"] for obs in observations) > 0
    finally:
        env.close()


@pytest.mark.skipif(importlib.util.find_spec("dm_control") is None, reason="dm_control is not installed")
def test_dmc_without_image_has_the_same_vectors_and_no_image():
    kwargs = dict(seed=3, action_repeat=2)
    with_image = make_env("dmc_cartpole_swingup", **kwargs)
    without = make_env("dmc_cartpole_swingup", dmc={"image": False}, **kwargs)
    try:
        assert "image" in with_image.obs_space and "image" not in without.obs_space
        assert set(with_image.obs_space) - {"image"} == set(without.obs_space)
        for a, b in zip(run_random(with_image, 5, seed=1), run_random(without, 5, seed=1), strict=True):
            check_obs(without, b)
            assert "image" not in b
            np.testing.assert_array_equal(a["position"], b["position"])  # rendering does not touch the physics
    finally:
        with_image.close()
        without.close()


@pytest.mark.skipif(importlib.util.find_spec("dm_control") is None, reason="dm_control is not installed")
def test_dmc_scalars_are_vectors_the_model_reads_or_scalars_it_skips():
    from dreamerv2_tf.algo.agent import model_obs_shapes
    from dreamerv2_tf.algo.obs_keys import select_keys

    for scalars, shape in (("vector", (1,)), ("scalar", ())):
        env = make_env("dmc_walker_walk", seed=0, action_repeat=2, dmc={"image": False, "scalars": scalars})
        try:
            assert env.obs_space["height"].shape == shape
            check_obs(env, run_random(env, 2)[-1])
            _, mlp = select_keys(model_obs_shapes(env.obs_space), "$^", ".*")
            assert ("height" in mlp) == (scalars == "vector") and "orientations" in mlp
        finally:
            env.close()


@pytest.mark.skipif(importlib.util.find_spec("dm_control") is None, reason="dm_control is not installed")
def test_unknown_dmc_task_lists_close_names():
    with pytest.raises(ValueError, match="dmc_walker_walk"):
        make_env("dmc_walker_wlak")


@pytest.mark.skipif(importlib.util.find_spec("crafter") is None, reason="crafter is not installed")
def test_crafter_reward_noreward_and_achievements():
    # The reward task shows the agent the true reward, the noreward task hides it, and both log it. Two
    # Crafter instances are not compared step by step: with the same seed and actions they still diverge
    # now and then (about 1 run in 12), since Crafter picks the creature to despawn from a set of objects,
    # whose order depends on memory addresses.
    rewarded, quiet = make_env("crafter_reward", seed=1), make_env("crafter_noreward", seed=1)
    assert rewarded.act_space["action"] == spaces.Discrete(17)
    achievements = [key for key in rewarded.obs_space if key.startswith("log_achievement_")]
    assert "log_achievement_collect_wood" in achievements and len(achievements) == 22
    with_reward, without = run_random(rewarded, 80), run_random(quiet, 80)
    rewarded.close()
    quiet.close()
    for obs in with_reward[:3]:
        check_obs(rewarded, obs)
    assert with_reward[0]["image"].shape == (64, 64, 3)
    np.testing.assert_array_equal([obs["reward"] for obs in with_reward], [obs["log_reward"] for obs in with_reward])
    assert all(obs["reward"] == 0 for obs in without)
    assert any(obs["reward"] != 0 for obs in with_reward)  # an achievement unlocks within 80 random steps
    assert any(obs["log_reward"] != 0 for obs in without)  # the hidden reward is still logged
    unlocked = sum(int(with_reward[-1][key]) for key in achievements)
    assert unlocked >= 1


# ---- Parallel envs ----------------------------------------------------------------------------


def collect(envs, steps, seed=0):
    """Step envs in lockstep with per-env random actions; returns per-env observation lists."""
    policies = [random_policy(env.act_space, 1, seed + index) for index, env in enumerate(envs)]
    data = [[env.reset()] for env in envs]
    for _ in range(steps):
        for env, policy, obs in zip(envs, policies, data, strict=True):
            if obs[-1]["is_last"]:
                obs.append(env.reset())
            action, _ = policy({"is_first": np.zeros(1)}, None)
            obs.append(env.step({"action": action["action"][0]}))
    return data


@pytest.mark.parametrize("parallel, task", [("thread", "atari_pong"), ("process", "atari_pong"),
                                            ("thread", "gym_CartPole-v1")])
def test_parallel_envs_match_serial(parallel, task):
    kwargs = {"seed": 10, "action_repeat": 4 if task.startswith("atari") else 1, "time_limit": 40}
    serial = make_envs(task, 2, "none", **kwargs)
    workers = make_envs(task, 2, parallel, **kwargs)
    try:
        assert workers[0].act_space == serial[0].act_space
        assert workers[0].obs_space.keys() == serial[0].obs_space.keys()
        expected, actual = collect(serial, 60), collect(workers, 60)
    finally:
        for env in serial + workers:
            env.close()
    for env_expected, env_actual in zip(expected, actual, strict=True):
        assert len(env_expected) == len(env_actual)
        for obs_expected, obs_actual in zip(env_expected, env_actual, strict=True):
            for key in obs_expected:
                np.testing.assert_array_equal(obs_expected[key], obs_actual[key])
    # Different seeds per worker: the two envs do not produce the same stream.
    main = "image" if task.startswith("atari") else "vector"
    assert not all(np.array_equal(a[main], b[main]) for a, b in zip(expected[0], expected[1], strict=False))


def test_process_env_reports_constructor_errors():
    with pytest.raises(ValueError, match="atari_pong"):
        make_envs("atari_pongg", 1, "process")
