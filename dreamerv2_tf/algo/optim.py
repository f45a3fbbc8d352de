"""Adam with global-norm clipping, decoupled weight decay and mixed-precision loss scaling.

Weight decay multiplies every variable by (1 - wd) at each update, before the Adam step, as the
authors' release does. Keras 3 scales its `weight_decay` by the learning rate (var -= var * wd * lr),
so the optimizer is given wd / lr, which makes that product wd.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from dreamerv2_tf.algo.replicas import mean_over_replicas


class _ReducedAdam(keras.optimizers.Adam):
    """Adam for gradients that `Optimizer.minimize` has already averaged over replicas.

    Keras 3's TF optimizer sums gradients over replicas only after clipping them per replica;
    here every replica passes the same, already reduced gradients, so clipping sees the global norm.
    """

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


if not hasattr(keras.optimizers.Adam, "_all_reduce_sum_gradients"):  # the hook overridden above
    raise ImportError(f"keras {keras.__version__} no longer reduces gradients in _all_reduce_sum_gradients; "
                      "dreamerv2_tf.algo.optim needs the Keras version pinned in requirements.txt")


class Optimizer(tf.Module):
    """One optimizer per module (model, actor, critic), as in the paper (Table D1).

    Under a float16 policy the loss is scaled dynamically by Keras'
    LossScaleOptimizer, which skips updates with non-finite gradients; the count
    of skipped updates and the scale are reported so divergence is visible.
    """

    def __init__(self, name: str, lr: float, eps: float = 1e-5, clip: float = 100.0, wd: float = 0.0,
                 mixed_float16: bool = False):
        super().__init__(name=name)
        if not lr > 0:
            raise ValueError(f"{name}_opt.lr must be positive, got {lr}")
        inner = _ReducedAdam(
            learning_rate=lr, epsilon=eps, weight_decay=(wd / lr) if wd else None,
            global_clipnorm=clip or None, name=f"{name}_adam")
        self._scaled = mixed_float16
        self.opt = keras.mixed_precision.LossScaleOptimizer(inner) if mixed_float16 else inner
        # Under tf.distribute each replica updates its own copy (aggregation NONE, no synchronisation,
        # also inside XLA): it adds the same amount everywhere, since it counts from reduced gradients.
        self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{name}_skipped")

    def build(self, variables: Sequence[tf.Variable]) -> None:
        self.opt.build(list(variables))

    def minimize(self, tape: tf.GradientTape, loss: tf.Tensor,
                 variables: Sequence[tf.Variable]) -> dict[str, tf.Tensor]:
        variables = list(variables)
        if self._scaled:
            # The tape has stopped recording, so scaling the loss here would cut the gradient path;
            # seeding the backward pass with the scale gives the gradients of scale * loss instead.
            seed = self.opt.scale_loss(tf.ones_like(loss))
            grads = tape.gradient(loss, variables, output_gradients=seed)
        else:
            grads = tape.gradient(loss, variables)
        # Data-parallel: the mean of the per-replica gradients (a no-op on one device).
        grads = mean_over_replicas(grads)
        norm = tf.linalg.global_norm(grads)
        metrics = {f"{self.name}_loss": tf.cast(loss, tf.float32)}
        if self._scaled:
            scale = tf.cast(self.opt.dynamic_scale, tf.float32)
            norm = tf.cast(norm, tf.float32) / scale
            self.skipped.assign_add(tf.cast(~tf.math.is_finite(norm), tf.int64))
            metrics[f"{self.name}_loss_scale"] = scale
            metrics[f"{self.name}_skipped_updates"] = tf.cast(self.skipped, tf.float32)
        self.opt.apply(grads, variables)
        metrics[f"{self.name}_grad_norm"] = tf.cast(norm, tf.float32)
        return metrics
