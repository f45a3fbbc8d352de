"""Exploration behaviours with their own actor-critic trained in imagination on an intrinsic reward.

- `Plan2Explore` (Sekar et al. 2020): an ensemble of one-step predictors of a world-model quantity
  (`disag_target`: stoch, deter, embed or feat), trained on the replayed sequences; the intrinsic reward
  of an imagined state is their disagreement, the standard deviation across the ensemble averaged over
  the predicted dimensions (its log with `disag_log`). With `disag_target: prior` the ensemble is the
  RSSM's own (`rssm.ensemble` prior heads, trained by the KL loss) and the disagreement is that of the
  heads' predicted latent distributions (class probabilities, or Gaussian means).
- `ModelLoss`: a head that predicts the world model's loss term `expl_model_loss` (the per-step KL by
  default); its prediction is the intrinsic reward.

Both follow the authors' release: the predictors read the features with the action stored at the same
step (`disag_action_cond`), predict the target `disag_offset` steps later, and the exploration reward is
`expl_intr_scale` * intrinsic + `expl_extr_scale` * the reward head's prediction.
"""

from __future__ import annotations

from collections.abc import Mapping

import tensorflow as tf

from dreamerv2_tf.algo import nets
from dreamerv2_tf.algo.behavior import ActorCritic
from dreamerv2_tf.algo.optim import Optimizer
from dreamerv2_tf.config import CHOICES

DISAG_TARGETS = CHOICES["disag_target"]


class _Explorer(tf.Module):
    """The exploration actor-critic and the reward it is trained on; subclasses define the intrinsic part."""

    def __init__(self, world_model, act_dim: int, discrete: bool, config, mixed_float16: bool,
                 env_step: tf.Variable, name: str):
        super().__init__(name=name)
        self.ac = ActorCritic(world_model.rssm.feat_size, act_dim, discrete, config, mixed_float16, env_step)
        self.intr_scale, self.extr_scale = float(config.expl_intr_scale), float(config.expl_extr_scale)
        self.opt = Optimizer("expl", **config.expl_opt, mixed_float16=mixed_float16)

    def build(self) -> None:
        self.ac.build()
        self.opt.build(self.trainable_heads)

    @property
    def trainable_heads(self) -> list:
        raise NotImplementedError

    def network_variables(self) -> list:
        """The weights this behaviour adds to the agent's (the checks for non-finite values read them)."""
        return self.trainable_heads + self.ac.network_weights()

    def train(self, world_model, start: Mapping[str, tf.Tensor], outputs: Mapping[str, tf.Tensor],
              data: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """One update of the intrinsic-reward heads on the replayed sequence, then of the exploration
        actor-critic in imagination from its posterior states `start`."""
        metrics = self.train_heads(outputs, data)
        metrics.update(self.ac.train(world_model, start, data["is_terminal"],
                                     lambda seq: self.reward(world_model, seq)))
        return metrics

    def reward(self, world_model, seq: Mapping[str, tf.Tensor]) -> tf.Tensor:
        reward = self.intr_scale * tf.cast(self.intrinsic(seq), tf.float32)
        if self.extr_scale:
            reward += self.extr_scale * tf.cast(world_model.heads["reward"](seq["feat"]).mode(), tf.float32)
        return reward

    def train_heads(self, outputs: Mapping[str, tf.Tensor], data: Mapping[str, tf.Tensor]) -> dict:
        raise NotImplementedError

    def intrinsic(self, seq: Mapping[str, tf.Tensor]) -> tf.Tensor:
        raise NotImplementedError


class Plan2Explore(_Explorer):
    def __init__(self, world_model, act_dim: int, discrete: bool, config, mixed_float16: bool = False,
                 env_step: tf.Variable | None = None):
        super().__init__(world_model, act_dim, discrete, config, mixed_float16, env_step, "plan2explore")
        if config.disag_target not in DISAG_TARGETS:
            raise ValueError(f"disag_target must be one of {', '.join(DISAG_TARGETS)}, got '{config.disag_target}'")
        if (int(config.disag_models) < 2 and config.disag_target != "prior") or int(config.disag_offset) < 1:
            raise ValueError("Plan2Explore needs disag_models >= 2 and disag_offset >= 1, got "
                             f"{config.disag_models} and {config.disag_offset}")
        rssm = world_model.rssm
        if config.disag_target == "prior" and rssm.ensemble < 2:
            raise ValueError(f"disag_target prior needs rssm.ensemble >= 2, got {rssm.ensemble}")
        self.rssm = rssm
        sizes = {"stoch": rssm.stoch * (rssm.discrete or 1), "deter": rssm.deter,
                 "embed": world_model.embed_size, "feat": rssm.feat_size}
        self.target, self.offset = config.disag_target, int(config.disag_offset)
        self.action_cond, self.log = bool(config.disag_action_cond), bool(config.disag_log)
        self.inputs_size = rssm.feat_size + (act_dim if self.action_cond else 0)
        # A dict, not a list: checkpoint views of the agent's layers (loop/checkpoint.py) keep dicts.
        self.heads = {} if self.target == "prior" else {
            f"head_{index}": nets.MLP((sizes[self.target],), **config.expl_head, dist="mse")
            for index in range(int(config.disag_models))}

    def build(self) -> None:
        for head in self.heads.values():
            head(tf.zeros([1, self.inputs_size]))
        super().build()

    @property
    def trainable_heads(self) -> list:
        return [v for head in self.heads.values() for v in head.trainable_variables]

    def _inputs(self, feat: tf.Tensor, action: tf.Tensor) -> tf.Tensor:
        if not self.action_cond:
            return feat
        return tf.concat([feat, tf.cast(action, feat.dtype)], -1)

    def train_heads(self, outputs: Mapping[str, tf.Tensor], data: Mapping[str, tf.Tensor]) -> dict:
        if not self.heads:  # the RSSM's prior heads, which the world model trains
            return {}
        post = outputs["post"]
        target = {"embed": outputs["embed"], "feat": outputs["feat"], "deter": post["deter"],
                  "stoch": tf.reshape(post["stoch"], tf.concat([tf.shape(post["stoch"])[:2], [-1]], 0))}[self.target]
        inputs = self._inputs(outputs["feat"], data["action"])
        # Step t's features (and stored action) predict the target `offset` steps later.
        inputs = tf.stop_gradient(inputs[:, :-self.offset])
        target = tf.stop_gradient(tf.cast(target[:, self.offset:], tf.float32))
        with tf.GradientTape() as tape:
            loss = -sum(tf.reduce_mean(head(inputs).log_prob(target)) for head in self.heads.values())
        return self.opt.minimize(tape, loss, self.trainable_heads)

    def intrinsic(self, seq: Mapping[str, tf.Tensor]) -> tf.Tensor:
        if self.heads:
            inputs = self._inputs(seq["feat"], seq["action"])
            predictions = tf.stack([tf.cast(head(inputs).mode(), tf.float32) for head in self.heads.values()])
        else:
            deter = seq["deter"]
            stats = self.rssm.ensemble_stats(tf.reshape(deter, [-1, deter.shape[-1]]))
            values = tf.nn.softmax(stats["logit"], -1) if "logit" in stats else stats["mean"]
            predictions = tf.reshape(values, tf.concat([[self.rssm.ensemble], tf.shape(deter)[:-1], [-1]], 0))
        disagreement = tf.reduce_mean(tf.math.reduce_std(predictions, 0), -1)
        return tf.math.log(disagreement) if self.log else disagreement


class ModelLoss(_Explorer):
    def __init__(self, world_model, act_dim: int, discrete: bool, config, mixed_float16: bool = False,
                 env_step: tf.Variable | None = None):
        super().__init__(world_model, act_dim, discrete, config, mixed_float16, env_step, "model_loss")
        if config.expl_model_loss != "kl":
            raise ValueError(f"expl_model_loss must be kl, got '{config.expl_model_loss}'")
        self.head = nets.MLP((), **config.expl_head, dist="mse")
        self.feat_size = world_model.rssm.feat_size

    def build(self) -> None:
        self.head(tf.zeros([1, self.feat_size]))
        super().build()

    @property
    def trainable_heads(self) -> list:
        return list(self.head.trainable_variables)

    def train_heads(self, outputs: Mapping[str, tf.Tensor], data: Mapping[str, tf.Tensor]) -> dict:
        target = tf.stop_gradient(tf.cast(outputs["kl"], tf.float32))
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(self.head(tf.stop_gradient(outputs["feat"])).log_prob(target))
        return self.opt.minimize(tape, loss, self.trainable_heads)

    def intrinsic(self, seq: Mapping[str, tf.Tensor]) -> tf.Tensor:
        return self.head(seq["feat"]).mode()


EXPLORERS = {"plan2explore": Plan2Explore, "model_loss": ModelLoss}

__all__ = ["Plan2Explore", "ModelLoss", "EXPLORERS"]
