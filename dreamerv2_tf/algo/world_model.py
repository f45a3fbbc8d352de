"""The DreamerV2 world model: representation, dynamics, heads and their losses (paper section 2.1)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import tensorflow as tf

from dreamerv2_tf.algo import nets
from dreamerv2_tf.algo.optim import Optimizer

REWARD_TRANSFORMS = {
    "identity": tf.identity,
    "tanh": tf.tanh,
    "sign": tf.sign,
}
HEADS = ("decoder", "reward", "discount")


class WorldModel(tf.Module):
    """Encoder, RSSM, image/reward/discount heads and the model optimizer.

    `obs_shapes` maps observation keys fed to the model to their shapes;
    `act_dim` is the size of the (one-hot or continuous) action vector.
    """

    def __init__(self, obs_shapes: Mapping[str, Sequence[int]], act_dim: int, config, mixed_float16: bool = False):
        super().__init__(name="world_model")
        if config.clip_rewards not in REWARD_TRANSFORMS:
            raise ValueError(f"clip_rewards must be one of {', '.join(REWARD_TRANSFORMS)}, "
                             f"got '{config.clip_rewards}'")
        unknown = [h for h in config.grad_heads if h not in HEADS]
        if unknown:
            raise ValueError(f"grad_heads: unknown head(s) {', '.join(unknown)}; choices: {', '.join(HEADS)}")
        self.act_dim = act_dim
        self.obs_shapes = {k: tuple(v) for k, v in obs_shapes.items()}
        self.encoder = nets.Encoder(self.obs_shapes, **config.encoder)
        self.rssm = nets.RSSM(**config.rssm)
        self.heads = {"decoder": nets.Decoder(self.obs_shapes, **config.decoder)}
        self.heads["reward"] = nets.MLP((), **config.reward_head, dist="mse")
        if config.pred_discount:
            self.heads["discount"] = nets.MLP((), **config.discount_head, dist="binary")
        self.grad_heads = tuple(config.grad_heads)
        self.loss_scales = dict(config.loss_scales)
        self.kl = dict(config.kl)
        self.discount = config.discount
        self._reward_transform = REWARD_TRANSFORMS[config.clip_rewards]
        self.opt = Optimizer("model", **config.model_opt, mixed_float16=mixed_float16)

    @property
    def modules(self) -> list:
        return [self.encoder, self.rssm, *self.heads.values()]

    @property
    def variables_to_train(self) -> list[tf.Variable]:
        return [v for module in self.modules for v in module.trainable_variables]

    def build(self, batch: int = 1) -> None:
        """Create all variables eagerly (and the optimizer slots) with a dummy sequence."""
        data = {k: tf.zeros([batch, 1, *s], tf.uint8 if len(s) == 3 else tf.float32)
                for k, s in self.obs_shapes.items()}
        data.update(action=tf.zeros([batch, 1, self.act_dim]), reward=tf.zeros([batch, 1]),
                    is_first=tf.ones([batch, 1], tf.bool), is_terminal=tf.zeros([batch, 1], tf.bool))
        outputs = self.loss(data)[2]
        self.embed_size = int(outputs["embed"].shape[-1])
        self.opt.build(self.variables_to_train)

    def preprocess(self, data: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Images and other uint8 inputs (Atari's RAM) to [-0.5, 0.5], transformed rewards, discount
        targets (0 at terminal steps)."""
        # Tensors from here on: the RSSM reads static ranks, which numpy batches (eager calls) lack.
        out = {k: tf.convert_to_tensor(v) for k, v in data.items()}
        for key, shape in self.obs_shapes.items():
            if key in out and (len(shape) == 3 or out[key].dtype == tf.uint8):
                out[key] = tf.cast(out[key], tf.float32) / 255.0 - 0.5
        if "reward" in out:
            out["reward"] = self._reward_transform(tf.cast(out["reward"], tf.float32))
        if "is_terminal" in out:
            out["discount"] = self.discount * (1.0 - tf.cast(out["is_terminal"], tf.float32))
        return out

    def train(self, data: Mapping[str, tf.Tensor], state=None):
        with tf.GradientTape() as tape:
            loss, state, outputs, metrics = self.loss(data, state)
        metrics.update(self.opt.minimize(tape, loss, self.variables_to_train))
        return state, outputs, metrics

    def loss(self, data: Mapping[str, tf.Tensor], state=None):
        data = self.preprocess(data)
        embed = self.encoder(data)
        post, prior = self.rssm.observe(embed, data["action"], data["is_first"], state)
        kl_loss, kl_value = self.rssm.kl_loss(post, prior, **self.kl)
        losses = {"kl": kl_loss}
        feat = self.rssm.get_feat(post)
        for name, head in self.heads.items():
            inputs = feat if name in self.grad_heads else tf.stop_gradient(feat)
            out = head(inputs)
            for key, dist in (out.items() if isinstance(out, dict) else [(name, out)]):
                losses[key] = -tf.reduce_mean(dist.log_prob(data[key]))
        model_loss = sum(self._scale(key) * value for key, value in losses.items())
        metrics = {f"{key}_loss": value for key, value in losses.items()}
        metrics["model_kl"] = tf.reduce_mean(kl_value)
        metrics["prior_ent"] = tf.reduce_mean(self.rssm.get_dist(prior).entropy())
        metrics["post_ent"] = tf.reduce_mean(self.rssm.get_dist(post).entropy())
        last_state = {k: v[:, -1] for k, v in post.items()}
        outputs = {"embed": embed, "feat": feat, "post": post, "prior": prior, "kl": kl_value}
        return model_loss, last_state, outputs, metrics

    def _scale(self, key: str) -> float:
        # Decoded observations are weighed by their kind, the other terms by their own name.
        decoder = self.heads["decoder"]
        name = "image" if key in decoder.cnn_keys else "proprio" if key in decoder.mlp_keys else key
        return self.loss_scales.get(name, 1.0)

    def imagine(self, policy: Callable, start: Mapping[str, tf.Tensor], is_terminal: tf.Tensor | None,
                horizon: int) -> dict[str, tf.Tensor]:
        """Roll the prior forward from every start state with actions from `policy`.

        Returns a dict of [horizon + 1, N, ...] tensors: the latent state, 'feat',
        'action' (the action that led to each state; zeros at the start),
        'discount' and 'weight' (cumulative product of earlier discounts).
        """
        flatten = lambda x: tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0))  # noqa: E731
        start = {k: tf.stop_gradient(flatten(v)) for k, v in start.items()}
        start["feat"] = self.rssm.get_feat(start)
        start["action"] = tf.zeros_like(policy(start["feat"]).mode())

        def step(prev, seed):
            action_seed, state_seed = tf.unstack(tf.random.split(seed, 2))
            state = {k: v for k, v in prev.items() if k not in ("feat", "action")}
            action = policy(tf.stop_gradient(prev["feat"])).sample(seed=action_seed)
            state = self.rssm.img_step(state, action, seed=state_seed)
            return {**state, "feat": self.rssm.get_feat(state), "action": action}

        seq = tf.scan(step, nets.step_seeds(horizon), start, parallel_iterations=1)
        seq = {k: tf.concat([start[k][None], v], 0) for k, v in seq.items()}
        if "discount" in self.heads:
            disc = self.heads["discount"](seq["feat"]).mean()
            if is_terminal is not None:
                # The start states are real: their discount comes from the data.
                first = self.discount * (1.0 - tf.cast(flatten(is_terminal), disc.dtype))
                disc = tf.concat([first[None], disc[1:]], 0)
        else:
            disc = self.discount * tf.ones(tf.shape(seq["feat"])[:-1], tf.float32)
        seq["discount"] = disc
        seq["weight"] = tf.math.cumprod(tf.concat([tf.ones_like(disc[:1]), disc[:-1]], 0), 0)
        return seq

    def video_pred(self, data: Mapping[str, tf.Tensor], key: str, context: int = 5, count: int = 6):
        """Open-loop prediction: `context` observed frames, then imagined ones; truth | model | error."""
        data = self.preprocess({k: v[:count] for k, v in data.items()})
        decoder = self.heads["decoder"]
        truth = data[key] + 0.5
        embed = self.encoder(data)
        states, _ = self.rssm.observe(embed[:, :context], data["action"][:, :context],
                                      data["is_first"][:, :context])
        recon = decoder(self.rssm.get_feat(states))[key].mode()
        init = {k: v[:, -1] for k, v in states.items()}
        prior = self.rssm.imagine(data["action"][:, context:], init)
        openl = decoder(self.rssm.get_feat(prior))[key].mode()
        model = tf.clip_by_value(tf.concat([recon, openl], 1) + 0.5, 0.0, 1.0)
        error = (model - truth + 1) / 2
        return tf.concat([truth, model, error], 2)
