"""Actor-critic in imagination (paper section 2.2): lambda returns, actor gradients, slow critic, entropy."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import discrete_actions, make_agent, obs_space, random_batch, tiny_config

from dreamerv2_tf.algo.behavior import ActorCritic, lambda_return, schedule
from dreamerv2_tf.algo.world_model import WorldModel

IMAGE = (64, 64, 1)
SMALL = {"encoder.cnn_depth": 2, "decoder.cnn_depth": 2}


def reference_lambda_return(reward, value, discount, bootstrap, lambda_):
    """Paper eq. 4 as a plain loop: V_t = r_t + g_t ((1 - lambda) v_{t+1} + lambda V_{t+1}), V_T = bootstrap."""
    horizon = len(reward)
    returns = np.zeros_like(reward)
    following = bootstrap
    for t in reversed(range(horizon)):
        next_value = value[t + 1] if t + 1 < horizon else bootstrap
        returns[t] = reward[t] + discount[t] * ((1 - lambda_) * next_value + lambda_ * following)
        following = returns[t]
    return returns


@pytest.mark.parametrize("lambda_", [0.0, 0.95, 1.0])
@pytest.mark.parametrize("with_bootstrap", [True, False])
def test_lambda_return_matches_a_plain_loop(lambda_, with_bootstrap):
    rng = np.random.default_rng(0)
    horizon, batch = 7, 3
    reward = rng.normal(size=(horizon, batch)).astype(np.float32)
    value = rng.normal(size=(horizon, batch)).astype(np.float32)
    discount = rng.uniform(0.8, 1.0, (horizon, batch)).astype(np.float32)
    discount[3, 1] = 0.0  # a terminal state in the middle of an imagined sequence
    bootstrap = rng.normal(size=batch).astype(np.float32) if with_bootstrap else np.zeros(batch, np.float32)
    got = lambda_return(*(tf.constant(x) for x in (reward, value, discount, bootstrap)), lambda_).numpy()
    want = reference_lambda_return(reward, value, discount, bootstrap, lambda_)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # After the terminal state nothing flows back: the return at t=3 is the reward there alone.
    np.testing.assert_allclose(got[3, 1], reward[3, 1], rtol=1e-6)


def test_lambda_return_of_constant_reward_reaches_the_geometric_sum():
    reward = tf.ones([200, 1])
    discount = tf.fill([200, 1], 0.9)
    returns = lambda_return(reward, tf.zeros([200, 1]), discount, tf.zeros([1]), 1.0).numpy()
    np.testing.assert_allclose(returns[0, 0], 10.0, rtol=1e-4)


def test_linear_schedule_interpolates_and_clips():
    values = [float(schedule("linear(1.0,0.0,10)", tf.constant(step, tf.int64))) for step in (0, 5, 10, 20)]
    np.testing.assert_allclose(values, [1.0, 0.5, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(float(schedule("linear(3e-3, 1e-4, 100)", 50)), 0.5 * (3e-3 + 1e-4), rtol=1e-5)
    np.testing.assert_allclose(float(schedule("linear(0,2,4)", -3)), 0.0)  # clipped below too
    np.testing.assert_allclose(float(schedule(0.25, 1000)), 0.25)
    with pytest.raises(ValueError, match="expected a number or linear"):
        schedule("cosine(1,0,10)", 0)


# Actor-critic with a tiny world model.


@pytest.fixture(scope="module")
def world_model():
    keras.utils.set_random_seed(0)
    wm = WorldModel({"image": IMAGE}, 2, tiny_config(SMALL))
    wm.build()
    data = random_batch(obs_space(IMAGE), discrete_actions(2), batch=2, length=3)
    _, _, outputs, _ = wm.loss(data)
    return wm, outputs["post"], data["is_terminal"]


def make_actor_critic(wm, overrides=None, seed: int = 0) -> ActorCritic:
    keras.utils.set_random_seed(seed)
    ac = ActorCritic(wm.rssm.feat_size, 2, True, tiny_config({**SMALL, **(overrides or {})}))
    ac.build()
    return ac


def reward_fn(wm):
    return lambda seq: wm.heads["reward"](seq["feat"]).mode()


def has_gradient(grads) -> bool:
    return any(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)


@pytest.mark.parametrize("actor_grad", ["reinforce", "dynamics", "both"])
def test_actor_gradient_paths(world_model, actor_grad):
    wm, post, is_terminal = world_model
    ac = make_actor_critic(wm, {"actor_grad": actor_grad, "actor_grad_mix": 0.5, "actor_ent": 0.0})
    with tf.GradientTape(persistent=True) as tape:
        seq = wm.imagine(ac.actor, post, is_terminal, ac.horizon)
        target, _ = ac.target(seq, reward_fn(wm)(seq))
        loss, _ = ac.actor_loss(seq, target)
    model_parts = {"reward head": wm.heads["reward"], "rssm": wm.rssm, "critic": ac.slow_critic}
    for name, module in model_parts.items():
        grads = tape.gradient(loss, module.trainable_variables)
        # Reinforce treats the return as a constant; dynamics backpropagates it through the model.
        assert has_gradient(grads) == (actor_grad != "reinforce"), name
    # Without an entropy bonus, dynamics reaches the actor only through its straight-through actions.
    assert has_gradient(tape.gradient(loss, ac.actor.trainable_variables))


def test_actor_grad_mix_weighs_dynamics_backprop_as_the_release_does(world_model):
    wm, post, is_terminal = world_model
    ac = make_actor_critic(wm, {"actor_ent": 0.0})
    seq = wm.imagine(ac.actor, post, is_terminal, ac.horizon)
    target, _ = ac.target(seq, reward_fn(wm)(seq))
    losses = {}
    for actor_grad, mix in [("dynamics", 0.0), ("reinforce", 0.0), ("both", 1.0), ("both", 0.0), ("both", 0.25)]:
        ac.actor_grad, ac.actor_grad_mix = actor_grad, mix
        losses[actor_grad, mix] = float(ac.actor_loss(seq, target)[0])
    dynamics, reinforce = losses["dynamics", 0.0], losses["reinforce", 0.0]
    assert abs(dynamics - reinforce) > 1e-3
    np.testing.assert_allclose(losses["both", 1.0], dynamics, rtol=1e-5)  # mix 1: pure dynamics
    np.testing.assert_allclose(losses["both", 0.0], reinforce, rtol=1e-5)  # mix 0: pure Reinforce
    np.testing.assert_allclose(losses["both", 0.25], 0.25 * dynamics + 0.75 * reinforce, rtol=1e-5)


def test_schedules_follow_the_agent_step_not_the_update_count(world_model):
    wm, post, is_terminal = world_model
    env_step = tf.Variable(0, dtype=tf.int64)
    keras.utils.set_random_seed(0)
    ac = ActorCritic(wm.rssm.feat_size, 2, True, tiny_config({**SMALL, "actor_ent": "linear(1.0,0.0,1000)"}),
                     env_step=env_step)
    ac.build()
    scales = []
    for step in (0, 250, 2000):
        env_step.assign(step)
        scales.append(float(ac.train(wm, post, is_terminal, reward_fn(wm))["actor_ent_scale"]))
    np.testing.assert_allclose(scales, [1.0, 0.75, 0.0], atol=1e-6)
    assert int(ac.updates.numpy()) == 3


def test_continuous_actor_learns_by_backpropagating_through_the_dynamics(world_model):
    wm, post, is_terminal = world_model
    keras.utils.set_random_seed(1)
    ac = ActorCritic(wm.rssm.feat_size, 2, False, tiny_config({**SMALL, "actor_ent": 0.0}))
    ac.build()
    assert ac.actor_grad == "dynamics"  # `auto` for continuous actions
    with tf.GradientTape() as tape:
        seq = wm.imagine(ac.actor, post, is_terminal, ac.horizon)
        target, _ = ac.target(seq, reward_fn(wm)(seq))
        loss, _ = ac.actor_loss(seq, target)
    actions = seq["action"][1:].numpy()
    assert actions.min() >= -1 and actions.max() <= 1 and actions.std() > 0.01
    # The truncated normal's reparameterized samples carry the return's gradient to the actor.
    assert has_gradient(tape.gradient(loss, ac.actor.trainable_variables))
    metrics = ac.train(wm, post, is_terminal, reward_fn(wm))
    assert all(np.isfinite(v.numpy()) for v in metrics.values())


def test_train_updates_only_actor_and_critic(world_model):
    wm, post, is_terminal = world_model
    ac = make_actor_critic(wm, {"actor_grad": "dynamics", "actor_opt.lr": 1e-2, "critic_opt.lr": 1e-2})
    model_before = [v.numpy() for v in wm.variables]
    actor_before = [v.numpy() for v in ac.actor.variables]
    critic_before = [v.numpy() for v in ac.critic.variables]
    metrics = ac.train(wm, post, is_terminal, reward_fn(wm))
    for key, value in metrics.items():
        assert np.isfinite(value.numpy()), key
    for before, var in zip(model_before, wm.variables, strict=True):
        np.testing.assert_array_equal(before, var.numpy())
    changed = lambda before, module: any(  # noqa: E731
        np.abs(b - v.numpy()).max() > 0 for b, v in zip(before, module.variables, strict=True))
    assert changed(actor_before, ac.actor) and changed(critic_before, ac.critic)
    assert int(ac.updates.numpy()) == 1


def test_slow_critic_follows_the_critic_every_slow_target_update_updates(world_model):
    wm, post, is_terminal = world_model
    ac = make_actor_critic(wm, {"slow_target_update": 3, "critic_opt.lr": 1e-2})
    snapshot = lambda module: [v.numpy() for v in module.variables]  # noqa: E731
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))  # noqa: E731
    critic, slow = [snapshot(ac.critic)], [snapshot(ac.slow_critic)]
    assert same(critic[0], slow[0])  # copied at build
    for _ in range(7):
        ac.train(wm, post, is_terminal, reward_fn(wm))
        critic.append(snapshot(ac.critic))
        slow.append(snapshot(ac.slow_critic))
    for call in range(1, 8):
        assert not same(critic[call], critic[call - 1])  # the critic learns on every call
        if (call - 1) % 3 == 0:
            # Updates 1, 4, 7 (as in the release): after its step the slow critic copies the critic.
            assert same(slow[call], critic[call]), call
        else:
            assert same(slow[call], slow[call - 1]), call
    assert not same(slow[4], slow[3]) and not same(slow[7], slow[6])


def test_slow_target_fraction_mixes_instead_of_copying(world_model):
    wm, post, is_terminal = world_model
    ac = make_actor_critic(wm, {"slow_target_update": 2, "slow_target_fraction": 0.25, "critic_opt.lr": 1e-2})
    ac.train(wm, post, is_terminal, reward_fn(wm))  # the first update copies (fraction 1)
    np.testing.assert_array_equal(ac.slow_critic.variables[0].numpy(), ac.critic.variables[0].numpy())
    ac.train(wm, post, is_terminal, reward_fn(wm))
    slow = [v.numpy() for v in ac.slow_critic.variables]
    ac.train(wm, post, is_terminal, reward_fn(wm))  # the third mixes in a quarter of the critic after its step
    critic = [v.numpy() for v in ac.critic.variables]
    for old, fast, new in zip(slow, critic, ac.slow_critic.variables, strict=True):
        np.testing.assert_allclose(new.numpy(), 0.25 * fast + 0.75 * old, rtol=1e-5, atol=1e-7)


def zero_critic(ac: ActorCritic) -> None:
    """Value 0 everywhere: with zero rewards the returns and advantages are exactly 0."""
    for module in (ac.critic, ac.slow_critic):
        for var in module._head._out.variables:
            var.assign(tf.zeros_like(var))


@pytest.mark.parametrize("actor_ent", [0.0, 1.0])
def test_entropy_bonus_raises_policy_entropy(world_model, actor_ent):
    wm, post, is_terminal = world_model
    ac = make_actor_critic(wm, {"actor_grad": "reinforce", "actor_ent": actor_ent, "actor_opt.lr": 1e-2,
                                "actor_opt.wd": 0.0})
    zero_critic(ac)
    bias = ac.actor._head._out.bias
    bias.assign([6.0, 0.0])  # start from a nearly deterministic policy
    zero_reward = lambda seq: tf.zeros(tf.shape(seq["feat"])[:-1])  # noqa: E731
    actor_before = [v.numpy() for v in ac.actor.variables]
    entropies = [float(ac.train(wm, post, is_terminal, zero_reward)["actor_ent"]) for _ in range(8 if actor_ent else 3)]
    if actor_ent:
        assert entropies[0] < 0.1
        assert entropies[-1] > entropies[0] + 0.2, entropies
    else:
        # No return signal and no bonus: nothing moves the actor.
        for before, var in zip(actor_before, ac.actor.variables, strict=True):
            np.testing.assert_allclose(before, var.numpy(), atol=1e-6)


def test_critic_learns_the_discounted_return_of_a_fixed_sequence():
    # Six imagined states with one-hot features; reward 1 everywhere, discount 0.9, and the
    # fifth state is terminal, so the true values are finite geometric sums v_t = sum_{k<5-t} 0.9^k.
    steps, gamma = 6, 0.9
    ac = ActorCritic(steps, 2, True, tiny_config({"slow_target": False, "critic_opt.lr": 1e-2}))
    keras.utils.set_random_seed(0)
    ac.build()
    feat = tf.tile(tf.eye(steps)[:, None], [1, 3, 1])
    discount = np.full((steps, 3), gamma, np.float32)
    discount[4] = 0.0
    seq = {"feat": feat, "discount": tf.constant(discount), "weight": tf.ones([steps, 3])}
    reward = tf.ones([steps, 3])

    @tf.function
    def update():
        target, _ = ac.target(seq, reward)
        with tf.GradientTape() as tape:
            loss = ac.critic_loss(seq, target)
        ac.critic_opt.minimize(tape, loss, ac.critic.trainable_variables)
        return target

    for _ in range(400):
        target = update()
    truth = np.array([(1 - gamma ** (5 - t)) / (1 - gamma) for t in range(5)])
    value = ac.critic(feat[:-1]).mode().numpy()[:, 0]
    np.testing.assert_allclose(value, truth, rtol=0.03)
    np.testing.assert_allclose(target.numpy()[:, 0], truth, rtol=0.03)


def test_invalid_actor_grad_raises():
    with pytest.raises(ValueError, match="actor_grad must be one of reinforce, dynamics, both, auto"):
        ActorCritic(8, 2, True, tiny_config({"actor_grad": "policy_gradient"}))


@pytest.mark.parametrize("prec", ["32", "16", "bf16"])
def test_agent_train_step_is_finite_in_every_precision(prec):
    obs, act = obs_space(IMAGE), discrete_actions(3)
    agent = make_agent(obs, act, SMALL, prec=prec)
    metrics, _ = agent.train(random_batch(obs, act, batch=2, length=4))
    for key in ("model_loss", "actor_loss", "critic_loss", "image_loss", "reward_loss", "kl_loss"):
        assert key in metrics, key
    for key, value in metrics.items():
        if not key.endswith("grad_norm"):  # inf on an update skipped by float16 loss scaling
            assert np.isfinite(value.numpy()), (prec, key)
    assert int(agent.step.numpy()) == 1
