"""Distributions used by the world model and the actor, built on TFP.

All parameters arrive here in float32 (the output layers of the networks run in
float32 under mixed precision), so log-probs, entropies and KLs are float32.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions


class OneHotDist(tfd.OneHotCategorical):
    """One-hot categorical whose samples carry straight-through gradients.

    The sample is one-hot in the forward pass; its gradient equals the gradient
    of the class probabilities (paper Algorithm 1).
    """

    def mode(self, name: str = "mode") -> tf.Tensor:
        # The parent's mode() returns a one-hot too, but carries no gradient path.
        probs = self.probs_parameter()
        mode = tf.one_hot(tf.argmax(probs, -1), probs.shape[-1], dtype=self.dtype)
        # Adding the zero-valued (probs - sg(probs)) last keeps the forward value exactly one-hot.
        return tf.stop_gradient(mode) + (probs - tf.stop_gradient(probs))

    def sample(self, sample_shape=(), seed=None, name: str = "sample") -> tf.Tensor:
        sample = tf.stop_gradient(super().sample(sample_shape, seed=seed))
        probs = tf.cast(self.probs_parameter(), self.dtype)
        return sample + (probs - tf.stop_gradient(probs))


def onehot(logits: tf.Tensor) -> OneHotDist:
    return OneHotDist(logits=tf.cast(logits, tf.float32), dtype=tf.float32)


def categorical_latent(logits: tf.Tensor) -> tfd.Distribution:
    """32 independent categoricals: event shape [stoch, classes]."""
    return tfd.Independent(onehot(logits), 1)


def gaussian_latent(mean: tf.Tensor, std: tf.Tensor) -> tfd.Distribution:
    return tfd.Independent(tfd.Normal(tf.cast(mean, tf.float32), tf.cast(std, tf.float32)), 1)


def unit_normal(mean: tf.Tensor, event_dims: int) -> tfd.Distribution:
    """Unit-variance Normal: log-prob = -0.5 * squared error - const (the MSE loss)."""
    return tfd.Independent(tfd.Normal(tf.cast(mean, tf.float32), 1.0), event_dims)


def bernoulli(logits: tf.Tensor) -> tfd.Distribution:
    """Bernoulli over the discount; log_prob also takes soft targets such as gamma."""
    return tfd.Independent(tfd.Bernoulli(logits=tf.cast(logits, tf.float32), dtype=tf.float32), 0)


def truncated_normal(mean: tf.Tensor, std: tf.Tensor) -> tfd.Distribution:
    """Continuous actions: samples stay within [-1, 1]; entropy and log-prob are analytic."""
    return tfd.Independent(
        tfd.TruncatedNormal(tf.cast(mean, tf.float32), tf.cast(std, tf.float32), -1.0, 1.0), 1)
