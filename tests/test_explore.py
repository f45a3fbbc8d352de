"""Exploration behaviours: Plan2Explore's ensemble and disagreement, ModelLoss, and which actor acts."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import discrete_actions, first_step, make_agent, obs_space, random_batch, tiny_config

from dreamerv2_tf.algo.explore import Plan2Explore
from dreamerv2_tf.loop.training import policy_mode

IMAGE = (64, 64, 1)
SMALL = {"encoder.cnn_depth": 2, "decoder.cnn_depth": 2, "disag_models": 3}


def agent_and_batch(behavior, **overrides):
    obs, act = obs_space(IMAGE), discrete_actions(3)
    agent = make_agent(obs, act, {**SMALL, "expl_behavior": behavior, **overrides}, seed=3)
    return agent, random_batch(obs, act, batch=3, length=6, seed=4)


def outputs_of(agent, data):
    _, _, outputs, _ = agent.wm.loss(data)
    return outputs


@pytest.fixture(scope="module")
def p2e():
    """A Plan2Explore agent for the tests that only read it; more explorers are built on its world model."""
    return agent_and_batch("plan2explore")


def explorer_on(agent, **overrides):
    explorer = Plan2Explore(agent.wm, 3, True, tiny_config({**SMALL, **overrides}), env_step=agent.env_step)
    explorer.build()
    return explorer


@pytest.mark.parametrize("log", [False, True])
def test_disagreement_is_the_ensembles_standard_deviation_averaged_over_dimensions(p2e, log):
    agent, data = p2e
    explorer = explorer_on(agent, disag_log=log)
    seq = agent.wm.imagine(agent.ac.actor, outputs_of(agent, data)["post"], data["is_terminal"], 4)
    inputs = np.concatenate([seq["feat"].numpy(), seq["action"].numpy()], -1)  # disag_action_cond
    predictions = np.stack([head(tf.constant(inputs)).mode().numpy() for head in explorer.heads.values()])
    expected = predictions.std(0).mean(-1)
    expected = np.log(expected) if log else expected
    np.testing.assert_allclose(explorer.intrinsic(seq).numpy(), expected, rtol=1e-5)
    # The exploration reward: intr_scale * disagreement, plus nothing of the task reward at extr_scale 0.
    np.testing.assert_allclose(explorer.reward(agent.wm, seq).numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("target, size", [("stoch", 16), ("deter", 32), ("feat", 48), ("embed", None)])
def test_ensemble_predicts_the_target_offset_steps_later_from_features_and_action(p2e, target, size):
    agent, data = p2e
    explorer, outputs = explorer_on(agent, disag_target=target, disag_offset=2), outputs_of(agent, data)
    post = outputs["post"]
    values = {"stoch": tf.reshape(post["stoch"], [3, 6, -1]), "deter": post["deter"], "feat": outputs["feat"],
              "embed": outputs["embed"]}[target].numpy()
    assert values.shape[-1] == (size or agent.wm.embed_size)
    inputs = tf.constant(np.concatenate([outputs["feat"].numpy(), data["action"]], -1)[:, :-2])
    expected = -sum(np.mean(head(inputs).log_prob(values[:, 2:]).numpy()) for head in explorer.heads.values())
    metrics = explorer.train_heads(outputs, data)  # the loss is computed before the step
    np.testing.assert_allclose(metrics["expl_loss"].numpy(), expected, rtol=1e-5)
    again = explorer.train_heads(outputs, data)["expl_loss"].numpy()
    assert again < metrics["expl_loss"].numpy()  # the step lowered it


def test_model_loss_head_learns_the_kl_and_rewards_it():
    agent, data = agent_and_batch("model_loss", expl_intr_scale=2.0)
    explorer, outputs = agent.explorer, outputs_of(agent, data)
    target, feat = outputs["kl"].numpy(), outputs["feat"]
    expected = -np.mean(explorer.head(feat).log_prob(target).numpy())
    first = explorer.train_heads(outputs, data)["expl_loss"].numpy()
    np.testing.assert_allclose(first, expected, rtol=1e-5)
    seq = {"feat": feat}
    np.testing.assert_allclose(explorer.reward(agent.wm, seq).numpy(), 2.0 * explorer.head(feat).mode().numpy(),
                               rtol=1e-5)


def test_explore_mode_acts_with_the_exploration_actor_and_the_others_with_the_task_actor():
    agent, data = agent_and_batch("plan2explore")
    # Output biases that make each actor all but certain of its own action.
    for actor, choice in ((agent.ac.actor, 2), (agent.explorer.ac.actor, 0)):
        layer = actor._head._out
        layer.kernel.assign(tf.zeros_like(layer.kernel))
        layer.bias.assign(tf.one_hot(choice, 3) * 50.0)
    obs = first_step(data, 0)
    for mode, choice in (("explore", 0), ("train", 2), ("eval", 2)):
        action = agent.policy(obs, None, mode)[0]["action"]
        assert (action.argmax(-1) == choice).all(), mode


def test_train_step_updates_the_explorer_and_logs_its_metrics():
    agent, data = agent_and_batch("plan2explore")
    before = [v.numpy().copy() for v in agent.explorer.network_variables()]
    metrics, _ = agent.train(data)
    for key in ("expl_expl_loss", "expl_actor_loss", "expl_critic_loss", "expl_reward_mean", "actor_loss"):
        assert np.isfinite(metrics[key].numpy()), key
    changed = [not np.array_equal(b, v.numpy()) for b, v in zip(before, agent.explorer.network_variables(),
                                                                strict=True)]
    assert sum(changed) > len(changed) // 2
    assert set(agent.param_counts()) == {"world_model", "actor", "critic", "plan2explore"}


def test_policy_mode_explores_until_expl_until_and_throughout_when_it_is_zero():
    assert [policy_mode(step, 100) for step in (0, 99, 100, 500)] == ["explore", "explore", "train", "train"]
    assert {policy_mode(step, 0) for step in (0, 10**9)} == {"explore"}


def test_from_checkpoint_restores_the_ensemble_and_the_exploration_actor(p2e, tmp_path):
    from dreamerv2_tf.loop.checkpoint import Checkpointer, restore_weights

    source = p2e[0]
    obs, act = obs_space(IMAGE), discrete_actions(3)
    target = make_agent(obs, act, {**SMALL, "expl_behavior": "plan2explore"}, seed=9)
    Checkpointer(tmp_path / "checkpoints", 1, agent=source).save(10)
    pairs = list(zip(source.explorer.network_variables(), target.explorer.network_variables(), strict=True))
    assert any(not np.array_equal(a.numpy(), b.numpy()) for a, b in pairs)  # other seeds, other weights
    restore_weights(str(tmp_path), target)
    for a, b in pairs:
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_bad_settings_are_refused(p2e):
    with pytest.raises(ValueError, match="disag_models >= 2"):
        explorer_on(p2e[0], disag_models=1)


def test_ensemble_rssm_picks_one_prior_head_per_step_and_its_disagreement_can_drive_plan2explore():
    obs, act = obs_space(IMAGE), discrete_actions(3)
    agent = make_agent(obs, act, {**SMALL, "rssm.ensemble": 3, "expl_behavior": "plan2explore",
                                  "disag_target": "prior"}, seed=5)
    rssm = agent.wm.rssm
    deter = tf.random.normal([4, rssm.deter], seed=1)
    stats = rssm.ensemble_stats(deter)["logit"].numpy()
    assert stats.shape == (3, 4, rssm.stoch, rssm.discrete)
    assert np.abs(stats[0] - stats[1]).max() > 1e-3  # heads of their own
    # A prior step uses one of the heads, the same for the whole batch; over many steps, each of them.
    rng = np.random.default_rng(0)
    state = {"deter": tf.constant(rng.normal(size=(4, rssm.deter)), tf.float32),
             "stoch": tf.one_hot(rng.integers(0, rssm.discrete, (4, rssm.stoch)), rssm.discrete),
             "logit": tf.zeros([4, rssm.stoch, rssm.discrete])}
    action = tf.one_hot([0, 1, 2, 0], 3)
    used = set()
    for _ in range(30):
        logit = rssm.img_step(state, action, sample=False)["logit"].numpy()
        matches = [index for index in range(3) if np.allclose(logit, rssm.ensemble_stats(
            rssm.img_step(state, action, sample=False)["deter"])["logit"].numpy()[index], atol=1e-5)]
        assert len(matches) == 1
        used.update(matches)
    assert used == {0, 1, 2}
    # The heads' disagreement as the intrinsic reward: std of the class probabilities across heads.
    seq = {"deter": tf.reshape(deter, [2, 2, -1])}
    probs = tf.nn.softmax(rssm.ensemble_stats(deter)["logit"], -1).numpy().reshape(3, 2, 2, -1)
    np.testing.assert_allclose(agent.explorer.intrinsic(seq).numpy(), probs.std(0).mean(-1), rtol=1e-5)
    assert agent.explorer.train_heads({}, {}) == {}  # nothing of its own to train
