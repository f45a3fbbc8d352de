"""World model (paper section 2.1): KL balancing, free nats, state resets, losses, precision, ablations, size."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import discrete_actions, obs_space, precision, random_batch, tiny_config

from dreamerv2_tf.algo import nets
from dreamerv2_tf.algo.agent import Agent
from dreamerv2_tf.algo.behavior import ActorCritic
from dreamerv2_tf.algo.optim import Optimizer
from dreamerv2_tf.algo.world_model import WorldModel
from dreamerv2_tf.config import build

IMAGE = (64, 64, 1)  # the decoder always produces 64x64 images
SMALL = {"encoder.cnn_depth": 2, "decoder.cnn_depth": 2}


def make_world_model(overrides=None, shapes=None, act_dim: int = 2, prec: str = "32", seed: int = 0) -> WorldModel:
    keras.utils.set_random_seed(seed)
    config = tiny_config({**SMALL, **(overrides or {})})
    with precision(prec):
        wm = WorldModel(shapes or {"image": IMAGE}, act_dim, config, mixed_float16=prec == "16")
        wm.build()
    return wm


def image_batch(batch: int = 2, length: int = 5, seed: int = 0, **kwargs):
    return random_batch(obs_space(IMAGE), discrete_actions(2), batch, length, seed, **kwargs)


def all_zero(grads) -> bool:
    """No gradient at all: every entry None (no path) or exactly zero."""
    return all(g is None or float(tf.reduce_max(tf.abs(g))) == 0.0 for g in grads)


# KL balancing (paper Algorithm 2).


def latent_pair(seed: int = 0, shape=(2, 6, 3, 5)):
    post = tf.Variable(tf.random.stateless_normal(shape, seed=[seed, 1]))
    prior = tf.Variable(tf.random.stateless_normal(shape, seed=[seed, 2]))
    return post, prior


@pytest.mark.parametrize("forward", [False, True])
def test_kl_balancing_sends_balance_of_the_gradient_to_the_prior(forward):
    rssm = nets.RSSM(stoch=3, deter=4, hidden=4, discrete=5)
    post, prior = latent_pair()
    with tf.GradientTape(persistent=True) as tape:
        lhs, rhs = (prior, post) if forward else (post, prior)
        plain_value = rssm.get_dist({"logit": lhs}).kl_divergence(rssm.get_dist({"logit": rhs}))
        plain = tf.reduce_mean(plain_value)
        loss, value = rssm.kl_loss({"logit": post}, {"logit": prior}, forward=forward, balance=0.8, free=0.0)
    np.testing.assert_allclose(loss.numpy(), plain.numpy(), rtol=1e-6)
    np.testing.assert_allclose(value.numpy(), plain_value.numpy(), rtol=1e-6)
    plain_post, plain_prior = tape.gradient(plain, [post, prior])
    got_post, got_prior = tape.gradient(loss, [post, prior])
    assert np.abs(plain_prior.numpy()).max() > 1e-4 and np.abs(plain_post.numpy()).max() > 1e-4
    np.testing.assert_allclose(got_prior.numpy(), 0.8 * plain_prior.numpy(), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(got_post.numpy(), 0.2 * plain_post.numpy(), rtol=1e-4, atol=1e-8)


def test_balance_half_is_the_plain_kl():
    rssm = nets.RSSM(stoch=3, deter=4, hidden=4, discrete=5)
    post, prior = latent_pair(seed=3)
    with tf.GradientTape(persistent=True) as tape:
        plain = tf.reduce_mean(rssm.get_dist({"logit": post}).kl_divergence(rssm.get_dist({"logit": prior})))
        loss, _ = rssm.kl_loss({"logit": post}, {"logit": prior}, balance=0.5, free=0.0)
    np.testing.assert_allclose(loss.numpy(), plain.numpy(), rtol=1e-6)
    for got, want in zip(tape.gradient(loss, [post, prior]), tape.gradient(plain, [post, prior]), strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("balance", [0.5, 0.8])
def test_free_nats_floor(balance):
    rssm = nets.RSSM(stoch=3, deter=4, hidden=4, discrete=5)
    post, prior = latent_pair(seed=4)
    _, value = rssm.kl_loss({"logit": post}, {"logit": prior}, balance=balance)
    mean_kl = float(tf.reduce_mean(value))
    # Below the floor the loss is the constant floor and sends no gradient.
    free = float(tf.reduce_max(value)) + 1.0
    with tf.GradientTape() as tape:
        loss, _ = rssm.kl_loss({"logit": post}, {"logit": prior}, balance=balance, free=free)
    np.testing.assert_allclose(loss.numpy(), free, rtol=1e-6)
    assert all_zero(tape.gradient(loss, [post, prior]))
    # Above the floor it is the KL itself.
    loss, _ = rssm.kl_loss({"logit": post}, {"logit": prior}, balance=balance, free=0.5 * float(tf.reduce_min(value)))
    np.testing.assert_allclose(loss.numpy(), mean_kl, rtol=1e-6)
    # Between: balanced KL floors the mean (free_avg), the plain KL (balance 0.5) each step, as in the release.
    loss, _ = rssm.kl_loss({"logit": post}, {"logit": prior}, balance=balance, free=mean_kl + 0.01)
    want = np.maximum(value.numpy(), mean_kl + 0.01).mean() if balance == 0.5 else mean_kl + 0.01
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-6)
    # Per-step floor (free_avg false): mean of max(KL_t, free).
    free = float(np.median(value.numpy()))
    loss, _ = rssm.kl_loss({"logit": post}, {"logit": prior}, balance=balance, free=free, free_avg=False)
    np.testing.assert_allclose(loss.numpy(), np.maximum(value.numpy(), free).mean(), rtol=1e-5)


# The RSSM over sequences.


def rssm_inputs(length: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    embed = tf.constant(rng.normal(size=(2, length, 5)), tf.float32)
    action = tf.constant(np.eye(3)[rng.integers(0, 3, (2, length))], tf.float32)
    return embed, action


def test_observe_resets_state_on_is_first():
    keras.utils.set_random_seed(0)
    rssm = nets.RSSM(stoch=3, deter=8, hidden=8, discrete=4)
    embed, action = rssm_inputs()
    reset = tf.constant([[True, False, False, True, False, False]] * 2)
    no_reset = tf.constant([[True] + [False] * 5] * 2)
    _, prior = rssm.observe(embed, action, reset)
    _, prior_carried = rssm.observe(embed, action, no_reset)
    post_fresh, prior_fresh = rssm.observe(embed[:, 3:], action[:, 3:], reset[:, 3:])
    # At the reset step the prior depends only on the zeroed state and action, so it is deterministic.
    for key in ("deter", "logit"):
        np.testing.assert_allclose(prior[key][:, 3].numpy(), prior_fresh[key][:, 0].numpy(), rtol=1e-6)
        assert np.abs(prior_carried[key][:, 3].numpy() - prior_fresh[key][:, 0].numpy()).max() > 1e-4
    # The posterior's statistics at the reset step too (they see the prior's deter and the embedding).
    post, _ = rssm.observe(embed, action, reset)
    np.testing.assert_allclose(post["logit"][:, 3].numpy(), post_fresh["logit"][:, 0].numpy(), rtol=1e-6)


def test_scans_in_one_graph_draw_independent_latents():
    # Every scan body is a graph of its own, and TensorFlow seeds a stateful random op from its place in its
    # graph: without seeds from outside, two scans in one train step (the posterior's in observe, the
    # prior's in imagination) would repeat each other's draws.
    keras.utils.set_random_seed(0)
    rssm = nets.RSSM(stoch=8, deter=8, hidden=8, discrete=16)
    embed, action = rssm_inputs()
    is_first = tf.constant([[True] + [False] * 5] * 2)
    uniform = {"deter": tf.zeros([2, 8]), "logit": tf.zeros([2, 8, 16]), "stoch": tf.zeros([2, 8, 16])}

    @tf.function
    def twice():
        posts = [rssm.observe(embed, action, is_first)[0]["stoch"] for _ in range(2)]
        priors = [rssm.imagine(action, uniform)["stoch"] for _ in range(2)]
        return posts, priors

    for first, second in twice():
        classes = [tf.argmax(draws, -1).numpy() for draws in (first, second)]
        assert np.mean(classes[0] == classes[1]) < 0.3  # 1/16 expected by chance


def test_obs_step_reset_matches_a_fresh_sequence_on_the_mode_path():
    keras.utils.set_random_seed(1)
    rssm = nets.RSSM(stoch=3, deter=8, hidden=8, discrete=4)
    embed, action = rssm_inputs(seed=1)
    # Batch item 0 starts a new episode at t=3, item 1 does not.
    firsts = np.zeros((2, 6), bool)
    firsts[:, 0] = True
    firsts[0, 3] = True

    def run(embed, action, firsts):
        state, logits = rssm.initial(2), []
        for t in range(embed.shape[1]):
            state, _ = rssm.obs_step(state, action[:, t], embed[:, t], tf.constant(firsts[:, t]), sample=False)
            logits.append(state["logit"].numpy())
        return np.stack(logits, 1)

    full = run(embed, action, firsts)
    fresh = run(embed[:, 3:], action[:, 3:], np.ones((2, 3), bool) & (np.arange(3) == 0))
    np.testing.assert_allclose(full[0, 3:], fresh[0], rtol=1e-5, atol=1e-6)
    assert np.abs(full[1, 3:] - fresh[1]).max() > 1e-4


# Losses and training.


def test_preprocess_scales_images_transforms_rewards_and_sets_discount_targets():
    wm = make_world_model({"clip_rewards": "tanh", "discount": 0.9})
    data = image_batch()
    data["is_terminal"][1, 2] = True
    out = wm.preprocess(data)
    assert out["image"].dtype == tf.float32
    np.testing.assert_allclose(out["image"].numpy(), data["image"] / 255.0 - 0.5, atol=1e-6)
    np.testing.assert_allclose(out["reward"].numpy(), np.tanh(data["reward"]), rtol=1e-6)
    want = np.full(data["reward"].shape, 0.9, np.float32)
    want[1, 2] = 0.0
    np.testing.assert_allclose(out["discount"].numpy(), want)


def test_preprocess_scales_uint8_vectors_like_images_and_leaves_float_vectors():
    wm = make_world_model(shapes={"image": IMAGE, "ram": (128,), "vector": (3,)})
    data = image_batch()
    rng = np.random.default_rng(3)
    data["ram"] = rng.integers(0, 256, (2, 5, 128), dtype=np.uint8)
    data["vector"] = rng.normal(size=(2, 5, 3)).astype(np.float32) * 100
    out = wm.preprocess(data)
    np.testing.assert_allclose(out["ram"].numpy(), data["ram"] / 255.0 - 0.5, atol=1e-6)
    np.testing.assert_array_equal(out["vector"].numpy(), data["vector"])
    assert np.isfinite(wm.loss(data)[0].numpy())  # the RAM reaches the MLP encoder and decoder


def test_world_model_loss_falls_on_a_fixed_batch():
    wm = make_world_model({"model_opt.lr": 1e-3})
    data = image_batch(batch=4, length=10, seed=1)
    # Each frame is black or white: to predict it the model must carry it through its latent state.
    rng = np.random.default_rng(2)
    data["image"][:] = 255 * rng.integers(0, 2, (4, 10, 1, 1, 1), dtype=np.uint8)
    # The unit-variance Gaussian and soft-Bernoulli constants put a floor under the loss; measure above it.
    gamma = wm.discount
    floor = 0.5 * math.log(2 * math.pi) * (np.prod(IMAGE) + 1)
    floor -= gamma * math.log(gamma) + (1 - gamma) * math.log(1 - gamma)
    train = tf.function(wm.train)
    excess = []
    for _ in range(120):
        _, _, metrics = train(data)
        excess.append(float(metrics["model_loss"]) - floor)
    assert excess[0] > 100
    assert max(excess[-5:]) < 0.5 * excess[0], (excess[0], excess[-5:])


def test_mixed_float16_layers_run_in_float16_and_losses_are_float32():
    wm = make_world_model(prec="16", seed=2)
    data = image_batch(length=4, seed=2)
    loss, last, outputs, metrics = wm.loss(data)
    assert outputs["embed"].dtype == tf.float16
    assert outputs["feat"].dtype == tf.float16
    assert outputs["post"]["deter"].dtype == tf.float16
    assert outputs["post"]["logit"].dtype == tf.float32
    assert last["deter"].shape == (2, wm.rssm.deter)
    assert loss.dtype == tf.float32 and np.isfinite(loss.numpy())
    for key, value in metrics.items():
        assert value.dtype == tf.float32 and np.isfinite(value.numpy()), key
    # Dynamic loss scaling: updates whose float16 gradients overflow are skipped and the scale halves,
    # until the scaled gradients fit; then updates apply.
    before = [v.numpy() for v in wm.variables_to_train]
    for _ in range(4):
        _, _, metrics = wm.train(data)
        for key, value in metrics.items():
            if key != "model_grad_norm":  # inf on a skipped update
                assert np.isfinite(value.numpy()), key
    assert float(metrics["model_skipped_updates"]) < 4
    assert float(metrics["model_loss_scale"]) < 2**15
    assert np.isfinite(metrics["model_grad_norm"].numpy())
    assert all(v.dtype == tf.float32 for v in wm.variables_to_train)
    assert any(np.abs(b - v.numpy()).max() > 0 for b, v in zip(before, wm.variables_to_train, strict=True))


@pytest.mark.parametrize("mixed", [False, True])
def test_optimizer_reports_the_unscaled_gradient_norm_and_steps(mixed):
    x = tf.Variable([3.0, -4.0])
    opt = Optimizer("test", lr=0.1, clip=0.0, mixed_float16=mixed)
    opt.build([x])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(x**2)
    metrics = opt.minimize(tape, loss, [x])
    np.testing.assert_allclose(metrics["test_grad_norm"].numpy(), 10.0, rtol=1e-6)  # |2x|
    np.testing.assert_allclose(metrics["test_loss"].numpy(), 25.0)
    np.testing.assert_allclose(x.numpy(), [2.9, -3.9], rtol=1e-4)  # Adam's first step moves each entry by lr


def test_gaussian_latents_build_and_train():
    wm = make_world_model({"rssm.discrete": 0, "model_opt.lr": 1e-3}, seed=3)
    data = image_batch(length=4, seed=3)
    _, _, outputs, _ = wm.loss(data)
    post = outputs["post"]
    assert {"mean", "std"} <= set(post) and "logit" not in post
    assert post["stoch"].shape == (2, 4, wm.rssm.stoch)
    assert outputs["feat"].shape[-1] == wm.rssm.stoch + wm.rssm.deter == wm.rssm.feat_size
    assert float(tf.reduce_min(post["std"])) >= 0.1  # min_std
    before = [v.numpy() for v in wm.rssm.trainable_variables]
    for _ in range(2):
        _, _, metrics = wm.train(data)
        assert all(np.isfinite(v.numpy()) for v in metrics.values())
    # Every RSSM weight learns, including the prior's, through the reparameterized samples and the KL.
    for old, var in zip(before, wm.rssm.trainable_variables, strict=True):
        assert np.abs(old - var.numpy()).max() > 0, var.path
    # Imagination with Gaussian latents for the actor-critic.
    ac = ActorCritic(wm.rssm.feat_size, 2, True, tiny_config(SMALL))
    ac.build()
    reward_fn = lambda seq: wm.heads["reward"](seq["feat"]).mode()  # noqa: E731
    metrics = ac.train(wm, outputs["post"], data["is_terminal"], reward_fn)
    assert all(np.isfinite(v.numpy()) for v in metrics.values())


@pytest.mark.parametrize("reward_grad", [False, True])
def test_grad_heads_controls_which_losses_shape_the_representation(reward_grad):
    heads = ["decoder", "discount"] + (["reward"] if reward_grad else [])
    wm = make_world_model({"grad_heads": heads}, seed=4)
    data = image_batch(length=4, seed=4)
    representation = wm.encoder.trainable_variables + wm.rssm.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        _, _, _, metrics = wm.loss(data)
    reward_to_repr = tape.gradient(metrics["reward_loss"], representation)
    assert all_zero(reward_to_repr) != reward_grad
    # The reward head itself always trains, and the decoder always shapes the representation.
    assert not all_zero(tape.gradient(metrics["reward_loss"], wm.heads["reward"].trainable_variables))
    assert not all_zero(tape.gradient(metrics["image_loss"], representation))


def test_vector_only_world_model():
    # Vector observations alone (e.g. the `vector` config for gym_CartPole-v1): no CNN decoder is needed.
    wm = make_world_model(shapes={"vector": (4,)})
    data = random_batch(obs_space(None, vector=4), discrete_actions(2), length=4)
    loss, _, _, metrics = wm.loss(data)
    assert np.isfinite(loss.numpy()) and "vector_loss" in metrics and "image_loss" not in metrics


def test_loss_scales_weigh_image_and_vector_terms():
    # `image` scales every CNN-decoded key, `proprio` every MLP-decoded key; the model loss is the weighted sum.
    shapes = {"image": IMAGE, "vector": (3,)}
    data = random_batch(obs_space(IMAGE, vector=3), discrete_actions(2), length=4)
    scales = {"loss_scales.image": 7.0, "loss_scales.proprio": 0.5, "loss_scales.kl": 0.3,
              "loss_scales.reward": 2.0, "loss_scales.discount": 3.0}
    wm = make_world_model(scales, shapes=shapes)
    loss, _, _, m = wm.loss(data)
    expected = (7.0 * m["image_loss"] + 0.5 * m["vector_loss"] + 0.3 * m["kl_loss"] + 2.0 * m["reward_loss"]
                + 3.0 * m["discount_loss"])
    np.testing.assert_allclose(loss.numpy(), expected.numpy(), rtol=1e-6)
    unscaled, _, _, _ = make_world_model(shapes=shapes).loss(data)  # same seed, same weights
    assert abs(float(unscaled) - float(loss)) > 1.0


def test_invalid_world_model_settings_raise_one_line_errors():
    with pytest.raises(ValueError, match="clip_rewards must be one of identity, tanh, sign"):
        WorldModel({"image": IMAGE}, 2, tiny_config({"clip_rewards": "log"}))
    with pytest.raises(ValueError, match="grad_heads: unknown head.*critic"):
        WorldModel({"image": IMAGE}, 2, tiny_config({"grad_heads": ["decoder", "critic"]}))


# Imagination.


def test_imagine_shapes_actions_and_discount_weights():
    wm = make_world_model({"discount": 0.9}, seed=5)
    data = image_batch(length=3, seed=5)
    data["is_terminal"][0, 1] = True
    _, _, outputs, _ = wm.loss(data)
    actor = nets.MLP((2,), layers=1, units=8, dist="onehot")
    horizon = 4
    seq = wm.imagine(actor, outputs["post"], data["is_terminal"], horizon)
    starts = 2 * 3
    assert seq["feat"].shape == (horizon + 1, starts, wm.rssm.feat_size)
    assert seq["action"].shape == (horizon + 1, starts, 2)
    np.testing.assert_array_equal(seq["action"][0].numpy(), 0.0)
    np.testing.assert_array_equal(seq["action"][1:].numpy().sum(-1), 1.0)
    # The start features are the posterior's; the first discount comes from the data.
    np.testing.assert_allclose(seq["feat"][0].numpy(), tf.reshape(outputs["feat"], [starts, -1]).numpy())
    disc = seq["discount"].numpy()
    np.testing.assert_allclose(disc[0], 0.9 * (1 - data["is_terminal"].reshape(-1)), rtol=1e-6)
    assert np.all((disc[1:] > 0) & (disc[1:] < 1))
    weight = seq["weight"].numpy()
    np.testing.assert_allclose(weight, np.cumprod(np.concatenate([np.ones_like(disc[:1]), disc[:-1]]), 0), rtol=1e-5)
    terminal_start = 1  # batch 0, time 1 in the flattened [B * L] starts
    np.testing.assert_array_equal(weight[1:, terminal_start], 0.0)


# Size of the Atari model (paper: 20M world model, 1M actor, 1M critic).


def test_atari_config_parameter_counts():
    keras.utils.set_random_seed(0)
    config = build(["defaults", "atari"], {"jit": False, "precision": "32"})
    with precision("32"):
        agent = Agent(obs_space((64, 64, 1)), discrete_actions(18), config)
    counts = agent.param_counts()
    assert abs(counts["world_model"] - 20e6) < 0.1 * 20e6, counts
    assert 0.8e6 < counts["actor"] < 1.3e6, counts
    assert 0.8e6 < counts["critic"] < 1.3e6, counts
