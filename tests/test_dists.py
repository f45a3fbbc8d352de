"""Distributions: straight-through one-hot, truncated normal, unit-variance normal, soft-target Bernoulli."""

import math

import numpy as np
import pytest
import tensorflow as tf
from helpers import precision

from dreamerv2_tf.algo import dists, nets


def test_straight_through_sample_gradient_equals_softmax_gradient():
    logits = tf.Variable(tf.random.stateless_normal([6, 3, 5], seed=[1, 2]) * 2)
    weights = tf.random.stateless_normal([6, 3, 5], seed=[3, 4])
    with tf.GradientTape(persistent=True) as tape:
        sample = dists.categorical_latent(logits).sample()
        through_sample = tf.reduce_sum(sample * weights)
        through_probs = tf.reduce_sum(tf.nn.softmax(logits) * weights)
    got = tape.gradient(through_sample, logits)
    want = tape.gradient(through_probs, logits)
    assert np.abs(want.numpy()).max() > 1e-3
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)


def test_one_hot_sample_and_mode_are_exact_one_hots():
    logits = tf.random.stateless_normal([500, 7], seed=[5, 6]) * 3
    dist = dists.onehot(logits)
    for value in (dist.sample(), dist.mode()):
        value = value.numpy()
        assert value.dtype == np.float32
        assert set(np.unique(value)) <= {0.0, 1.0}
        np.testing.assert_array_equal(value.sum(-1), 1.0)
    np.testing.assert_array_equal(dist.mode().numpy().argmax(-1), logits.numpy().argmax(-1))


def test_one_hot_mode_carries_probability_gradient():
    logits = tf.Variable([[0.5, -1.0, 2.0]])
    weights = tf.constant([[1.0, 2.0, -3.0]])
    with tf.GradientTape(persistent=True) as tape:
        through_mode = tf.reduce_sum(dists.onehot(logits).mode() * weights)
        through_probs = tf.reduce_sum(tf.nn.softmax(logits) * weights)
    np.testing.assert_allclose(tape.gradient(through_mode, logits), tape.gradient(through_probs, logits), atol=1e-6)


def test_one_hot_samples_follow_the_probabilities():
    logits = tf.math.log([[0.7, 0.2, 0.1]])
    samples = dists.onehot(tf.tile(logits, [20000, 1])).sample().numpy()
    np.testing.assert_allclose(samples.mean(0), [0.7, 0.2, 0.1], atol=0.02)


def test_truncated_normal_samples_in_bounds_with_finite_differentiable_entropy_and_log_prob():
    mean = tf.Variable([[0.9, -0.95, 0.0]])
    std = tf.Variable([[2.0, 0.1, 5.0]])
    with tf.GradientTape(persistent=True) as tape:
        dist = dists.truncated_normal(mean, std)
        sample = dist.sample(2000, seed=7)
        entropy = dist.entropy()
        log_prob = dist.log_prob(tf.constant([[1.0, -1.0, 0.3]]))
    sample = sample.numpy()
    assert sample.min() >= -1.0 and sample.max() <= 1.0
    assert sample.std(0).min() > 0.01  # not collapsed onto a bound
    assert entropy.shape == (1,) and log_prob.shape == (1,)
    for value in (entropy, log_prob):
        assert np.all(np.isfinite(value.numpy()))
        for grad in tape.gradient(value, [mean, std]):
            assert grad is not None and np.all(np.isfinite(grad.numpy()))
            assert np.abs(grad.numpy()).max() > 0


def test_unit_normal_log_prob_is_negative_half_squared_error_minus_constant():
    mean = tf.random.stateless_normal([4, 3, 2], seed=[1, 1])
    target = tf.random.stateless_normal([4, 3, 2], seed=[2, 2])
    got = dists.unit_normal(mean, 2).log_prob(target).numpy()
    sq = ((mean - target).numpy() ** 2).sum((-1, -2))
    assert got.shape == (4,)
    np.testing.assert_allclose(got, -0.5 * sq - 6 * 0.5 * math.log(2 * math.pi), rtol=1e-5)


def test_bernoulli_log_prob_with_soft_target():
    logits = tf.constant([0.3, -1.0, 4.0])
    target = tf.constant([0.99, 0.5, 0.0])
    probs = 1 / (1 + np.exp(-logits.numpy()))
    want = target.numpy() * np.log(probs) + (1 - target.numpy()) * np.log(1 - probs)
    dist = dists.bernoulli(logits)
    np.testing.assert_allclose(dist.log_prob(target).numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(dist.mean().numpy(), probs, rtol=1e-6)


def test_gaussian_latent_is_independent_over_the_last_axis():
    dist = dists.gaussian_latent(tf.zeros([2, 3]), tf.ones([2, 3]))
    assert dist.event_shape == (3,)
    np.testing.assert_allclose(dist.log_prob(tf.zeros([2, 3])).numpy(), 3 * -0.5 * math.log(2 * math.pi), rtol=1e-6)


@pytest.mark.parametrize("kind", ["mse", "binary", "onehot", "trunc_normal"])
def test_distribution_outputs_are_float32_under_mixed_float16(kind):
    with precision("16"):
        layer = nets.DistLayer((3,), kind)
        features = tf.random.stateless_normal([4, 8], seed=[0, 1], dtype=tf.float16)
        dist = layer(features)
    sample = dist.sample()
    target = tf.one_hot([0, 1, 2, 0], 3) if kind in ("onehot", "binary") else tf.zeros([4, 3])
    outputs = {"sample": sample, "mode": dist.mode(), "log_prob": dist.log_prob(target)}
    if kind != "mse":
        outputs["entropy"] = dist.entropy()
    for name, value in outputs.items():
        assert value.dtype == tf.float32, name
        assert np.all(np.isfinite(value.numpy())), name
