"""Actor-critic learning in imagination (paper section 2.2, equations 4-6)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import tensorflow as tf

from dreamerv2_tf.algo import nets
from dreamerv2_tf.algo.optim import Optimizer
from dreamerv2_tf.config import CHOICES

ACTOR_GRADS = CHOICES["actor_grad"]


def lambda_return(reward: tf.Tensor, value: tf.Tensor, discount: tf.Tensor, bootstrap: tf.Tensor,
                  lambda_: float) -> tf.Tensor:
    """Paper eq. 4 over a time-major sequence of length T:

    V_t = r_t + gamma_t * ((1 - lambda) * v_{t+1} + lambda * V_{t+1}),  V_T = bootstrap.
    `value` holds v_0..v_{T-1}; the recursion runs backwards as a compiled scan.
    """
    next_values = tf.concat([value[1:], bootstrap[None]], 0)
    inputs = reward + discount * next_values * (1 - lambda_)
    returns = tf.scan(
        lambda agg, cur: cur[0] + cur[1] * lambda_ * agg,
        (inputs, discount), bootstrap, reverse=True)
    return returns


_LINEAR = re.compile(r"linear\(([^,]+),([^,]+),([^,]+)\)")


def schedule(value: float | str, step: tf.Tensor) -> tf.Tensor:
    """A constant, or `linear(start,end,steps)` interpolated over `step` (the agent step)."""
    if isinstance(value, str):
        match = _LINEAR.fullmatch(value.replace(" ", ""))
        if not match:
            raise ValueError(f"unknown schedule '{value}'; expected a number or linear(start,end,steps)")
        start, end, duration = (float(x) for x in match.groups())
        frac = tf.clip_by_value(tf.cast(step, tf.float32) / duration, 0.0, 1.0)
        return (1 - frac) * start + frac * end
    return tf.constant(float(value), tf.float32)


class ActorCritic(tf.Module):
    """Actor and critic MLPs over model features, a slow target critic and their optimizers.

    `env_step` is the agent-step counter that schedules (`actor_ent`, `actor_grad_mix`) follow;
    without it they follow this module's update count.
    """

    def __init__(self, feat_size: int, act_dim: int, discrete: bool, config, mixed_float16: bool = False,
                 env_step: tf.Variable | None = None):
        super().__init__(name="actor_critic")
        if config.actor_grad not in ACTOR_GRADS:
            raise ValueError(f"actor_grad must be one of {', '.join(ACTOR_GRADS)}, got '{config.actor_grad}'")
        actor = dict(config.actor)
        dist = actor.pop("dist")
        if dist == "auto":
            dist = "onehot" if discrete else "trunc_normal"
        self.feat_size, self.act_dim = feat_size, act_dim
        self.actor = nets.MLP((act_dim,), **actor, dist=dist)
        self.critic = nets.MLP((), **config.critic, dist="mse")
        self.slow_critic = nets.MLP((), **config.critic, dist="mse") if config.slow_target else self.critic
        self.actor_grad = config.actor_grad if config.actor_grad != "auto" else (
            "reinforce" if discrete else "dynamics")
        self.actor_grad_mix = config.actor_grad_mix
        self.actor_ent = config.actor_ent
        self.horizon = config.imag_horizon
        self.lambda_ = config.discount_lambda
        self.slow_update = config.slow_target_update
        self.slow_fraction = config.slow_target_fraction
        self.slow_baseline = config.slow_baseline
        self.actor_opt = Optimizer("actor", **config.actor_opt, mixed_float16=mixed_float16)
        self.critic_opt = Optimizer("critic", **config.critic_opt, mixed_float16=mixed_float16)
        self.updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="ac_updates",
                                   aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self._env_step = env_step

    def network_weights(self) -> list:
        """The weights of the actor, the critic and (when separate) the slow critic."""
        networks = {id(n): n for n in (self.actor, self.critic, self.slow_critic)}.values()
        return [weight for network in networks for weight in network.weights]

    def build(self) -> None:
        feat = tf.zeros([1, self.feat_size])
        self.actor(feat)
        self.critic(feat)
        if self.slow_critic is not self.critic:
            self.slow_critic(feat)
            for slow, fast in zip(self.slow_critic.variables, self.critic.variables, strict=True):
                slow.assign(fast)
        self.actor_opt.build(self.actor.trainable_variables)
        self.critic_opt.build(self.critic.trainable_variables)

    def train(self, world_model, start: Mapping[str, tf.Tensor], is_terminal: tf.Tensor,
              reward_fn: Callable[[dict], tf.Tensor]) -> dict[str, tf.Tensor]:
        with tf.GradientTape() as actor_tape:
            seq = world_model.imagine(self.actor, start, is_terminal, self.horizon)
            reward = tf.cast(reward_fn(seq), tf.float32)
            target, metrics = self.target(seq, reward)
            actor_loss, actor_metrics = self.actor_loss(seq, target)
        with tf.GradientTape() as critic_tape:
            critic_loss = self.critic_loss(seq, target)
        metrics.update(actor_metrics)
        metrics.update(self.actor_opt.minimize(actor_tape, actor_loss, self.actor.trainable_variables))
        metrics.update(self.critic_opt.minimize(critic_tape, critic_loss, self.critic.trainable_variables))
        metrics["reward_mean"] = tf.reduce_mean(reward)
        self._update_slow_critic()
        self.updates.assign_add(1)
        return metrics

    def target(self, seq: Mapping[str, tf.Tensor], reward: tf.Tensor):
        value = tf.cast(self.slow_critic(seq["feat"]).mode(), tf.float32)
        disc = tf.cast(seq["discount"], tf.float32)
        target = lambda_return(reward[:-1], value[:-1], disc[:-1], value[-1], self.lambda_)
        return target, {"critic_slow": tf.reduce_mean(value), "critic_target": tf.reduce_mean(target)}

    def actor_loss(self, seq: Mapping[str, tf.Tensor], target: tf.Tensor):
        # The action at index t+1 was taken in state t; the return that follows it is target[t+1].
        policy = self.actor(tf.stop_gradient(seq["feat"][:-2]))
        step = self.updates if self._env_step is None else self._env_step
        if self.actor_grad == "dynamics":
            objective = target[1:]
        else:
            baseline_net = self.slow_critic if self.slow_baseline else self.critic
            baseline = tf.cast(baseline_net(seq["feat"][:-2]).mode(), tf.float32)
            advantage = tf.stop_gradient(target[1:] - baseline)
            reinforce = policy.log_prob(tf.stop_gradient(seq["action"][1:-1])) * advantage
            if self.actor_grad == "reinforce":
                objective = reinforce
            else:  # the release's convention: mix weighs dynamics backprop (mix = 1 - rho of the paper)
                mix = schedule(self.actor_grad_mix, step)
                objective = mix * target[1:] + (1 - mix) * reinforce
        entropy = policy.entropy()
        ent_scale = schedule(self.actor_ent, step)
        objective += ent_scale * entropy
        weight = tf.stop_gradient(tf.cast(seq["weight"], tf.float32))
        loss = -tf.reduce_mean(weight[:-2] * objective)
        return loss, {"actor_ent": tf.reduce_mean(entropy), "actor_ent_scale": ent_scale}

    def critic_loss(self, seq: Mapping[str, tf.Tensor], target: tf.Tensor) -> tf.Tensor:
        # No loss on the last imagined step: it has no return target.
        dist = self.critic(tf.stop_gradient(seq["feat"][:-1]))
        weight = tf.stop_gradient(tf.cast(seq["weight"], tf.float32))
        return -tf.reduce_mean(dist.log_prob(tf.stop_gradient(target)) * weight[:-1])

    def _update_slow_critic(self) -> None:
        """After updates 1, 1 + n, 1 + 2n, ... (n = slow_target_update) the slow critic moves to the critic.

        The first move is a full copy; later ones mix in `slow_target_fraction`.
        """
        if self.slow_critic is self.critic:
            return
        # Under tf.distribute each replica updates its own copy from critic weights that are identical
        # on every replica (they change only by reduced gradients), so the copies stay equal.
        due = tf.equal(self.updates % self.slow_update, 0)
        fraction = tf.where(tf.equal(self.updates, 0), 1.0, tf.constant(self.slow_fraction, tf.float32))
        mix = tf.where(due, fraction, 0.0)
        for slow, fast in zip(self.slow_critic.variables, self.critic.variables, strict=True):
            slow.assign(mix * fast + (1 - mix) * slow)
