"""Driver: stepping envs with a batched policy, callbacks, counts and resets."""

import numpy as np
import pytest
from gymnasium import spaces

from dreamerv2_tf.envs import make_env, make_envs
from dreamerv2_tf.loop.driver import Driver, random_policy
from dreamerv2_tf.loop.replay import Replay


def test_counts_and_episodes_match_the_env():
    envs = make_envs("gym_CartPole-v1", 2, seed=3)
    episodes, steps, resets = [], [], []
    driver = Driver(envs, on_step=[lambda tran, worker: steps.append((worker, tran))],
                    on_episode=[lambda ep, worker: episodes.append((worker, ep))],
                    on_reset=[lambda tran, worker: resets.append(worker)])
    result = driver(random_policy(envs[0].act_space, 2, seed=0), episodes=3)
    assert result["episodes"] == len(episodes) >= 3 and driver.episodes == result["episodes"]
    assert driver.steps == result["steps"] == len(steps) - len(resets)  # resets are not agent steps
    assert result["steps"] % 2 == 0  # all envs step together
    for _, episode in episodes:
        length = len(episode["reward"])
        assert episode["is_first"][0] and not episode["is_first"][1:].any()
        assert episode["is_last"][-1] and not episode["is_last"][:-1].any()
        np.testing.assert_array_equal(episode["action"][0], [0, 0])
        np.testing.assert_array_equal(episode["action"][1:].sum(-1), np.ones(length - 1))  # one-hot
    # Replaying the recorded actions in a fresh env with the same seed reproduces each worker's
    # first episode, which also checks that each step stores the action that led to it.
    firsts = {}
    for worker, episode in episodes:
        firsts.setdefault(worker, episode)
    assert set(firsts) == {0, 1}
    for worker, episode in firsts.items():
        env = make_env("gym_CartPole-v1", seed=3 + worker)
        replayed = [env.reset()] + [env.step({"action": action}) for action in episode["action"][1:]]
        env.close()
        for key in ("vector", "reward", "is_first", "is_last", "is_terminal"):
            np.testing.assert_array_equal(np.stack([obs[key] for obs in replayed]), episode[key])
    for env in envs:
        env.close()


def test_steps_budget_and_resume_between_calls():
    env = make_env("gym_CartPole-v1", seed=0, time_limit=7)
    lengths = []
    driver = Driver([env], on_episode=[lambda ep, worker: lengths.append(len(ep["reward"]))])
    policy = random_policy(env.act_space, 1, seed=0)
    assert driver(policy, steps=5) == {"steps": 5, "episodes": 0}
    driver(policy, steps=2)  # continues the same episode: 7 agent steps in total
    assert lengths == [8]  # 7 steps plus the reset observation
    assert driver.steps == 7 and driver.episodes == 1
    env.close()


def test_policy_state_is_kept_and_first_obs_flag_reset():
    env = make_env("gym_CartPole-v1", seed=0, time_limit=3)
    calls = []

    def policy(obs, state):
        calls.append((state, bool(obs["is_first"][0]), obs["vector"].shape))
        return {"action": np.array([[1.0, 0.0]])}, (state or 0) + 1

    driver = Driver([env])
    driver(policy, steps=4)
    assert [call[0] for call in calls] == [None, 1, 2, 3]
    assert [call[1] for call in calls] == [True, False, False, True]  # the env reset after 3 steps
    assert calls[0][2] == (1, 4)
    driver.reset()
    calls.clear()
    driver(policy, steps=1)
    assert calls == [(None, True, (1, 4))]  # reset() drops the in-progress episode and the state
    env.close()


def test_driver_feeds_replay_with_complete_episodes(tmp_path):
    envs = make_envs("atari_pong", 2, seed=0, action_repeat=4, time_limit=15)
    replay = Replay(tmp_path)
    emitted = []
    driver = Driver(envs, on_step=[replay.add_step], on_episode=[lambda ep, worker: emitted.append(ep)])
    driver(random_policy(envs[0].act_space, 2, seed=1), episodes=4)
    for env in envs:
        env.close()
    stored = Replay(tmp_path).episodes()
    assert len(stored) == len(emitted) == 4
    by_signature = {(ep["image"].sum(), ep["action"].argmax(-1).tobytes()): ep for ep in stored}
    for episode in emitted:
        match = by_signature[(episode["image"].sum(), episode["action"].argmax(-1).tobytes())]
        assert len(match["reward"]) == 16
        for key in episode:
            np.testing.assert_array_equal(match[key], episode[key])
    assert stored[0]["image"].dtype == np.uint8 and stored[0]["action"].shape == (16, 18)


@pytest.mark.parametrize("parallel", ["thread", "process"])
def test_parallel_driver_matches_serial(parallel):
    def run(mode):
        envs = make_envs("gym_CartPole-v1", 2, mode, seed=4, time_limit=20)
        episodes = []
        Driver(envs, on_episode=[lambda ep, worker: episodes.append((worker, ep))])(
            random_policy(envs[0].act_space, 2, seed=2), steps=60)
        for env in envs:
            env.close()
        return episodes

    serial, parallel_run = run("none"), run(parallel)
    assert len(serial) == len(parallel_run) > 0
    for (worker_a, ep_a), (worker_b, ep_b) in zip(serial, parallel_run, strict=True):
        assert worker_a == worker_b
        for key in ep_a:
            np.testing.assert_array_equal(ep_a[key], ep_b[key])


def test_random_policy_spaces():
    discrete = random_policy({"action": spaces.Discrete(5)}, 3, seed=0)
    action, state = discrete({"is_first": np.zeros(3, bool)}, "s")
    assert state == "s" and action["action"].shape == (3, 5) and action["action"].dtype == np.float32
    np.testing.assert_array_equal(action["action"].sum(-1), [1, 1, 1])
    continuous = random_policy(spaces.Box(-1, 1, (2,), np.float32), 4, seed=0)
    values = np.concatenate([continuous({"is_first": np.zeros(4)}, None)[0]["action"] for _ in range(50)])
    assert values.shape == (200, 2) and values.min() >= -1 and values.max() <= 1 and values.std() > 0.4


def test_bad_policy_output_is_a_clear_error():
    env = make_env("gym_CartPole-v1")
    driver = Driver([env])
    with pytest.raises(ValueError, match=r"shape \(1, A\)"):
        driver(lambda obs, state: ({"action": np.zeros((3, 2))}, state), steps=1)
    env.close()
    with pytest.raises(ValueError, match="at least one env"):
        Driver([])
