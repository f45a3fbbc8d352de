"""Keras 3 layers of the agent: encoder, decoder, RSSM and MLP heads.

Hidden layers run in the global compute dtype (float16 under mixed precision);
layers that output distribution parameters run in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from dreamerv2_tf.algo import convs, dists
from dreamerv2_tf.algo.obs_keys import select_keys
from dreamerv2_tf.config import CHOICES

ACTIVATIONS = CHOICES[r".*\.act"]
NORMS = CHOICES[r".*\.norm"]


def _check(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got '{value}'")
    return value


def activation(name: str) -> Callable[[tf.Tensor], tf.Tensor]:
    _check("act", name, ACTIVATIONS)
    return (lambda x: x) if name == "none" else getattr(tf.nn, name)


def norm_layer(name: str) -> keras.layers.Layer | None:
    _check("norm", name, NORMS)
    return keras.layers.LayerNormalization(epsilon=1e-3) if name == "layer" else None


def _apply_leading(fn: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor, event_dims: int) -> tf.Tensor:
    """Apply fn over the last event_dims axes, folding all leading axes into one batch axis."""
    shape = tf.shape(x)
    lead, event = shape[:-event_dims], x.shape[-event_dims:]
    y = fn(tf.reshape(x, tf.concat([[-1], event], 0)))
    return tf.reshape(y, tf.concat([lead, tf.shape(y)[1:]], 0))


class DenseStack(keras.layers.Layer):
    """Dense -> (norm) -> activation, repeated."""

    def __init__(self, units: Sequence[int], act: str = "elu", norm: str = "none", **kwargs):
        super().__init__(**kwargs)
        self._act = activation(act)
        # Sublayers live in tuples, not lists: Keras 3 keeps lists in its own type, which TensorFlow
        # checkpoints do not follow, so their variables would be left out of checkpoints.
        self._dense = tuple(keras.layers.Dense(size) for size in units)
        self._norms = tuple(norm_layer(norm) for _ in units)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        for dense, norm in zip(self._dense, self._norms, strict=True):
            x = dense(x)
            if norm is not None:
                x = norm(x)
            x = self._act(x)
        return x


class DistLayer(keras.layers.Layer):
    """Maps features to a distribution; the output projection runs in float32."""

    KINDS = ("mse", "binary", "onehot", "trunc_normal")

    def __init__(self, shape: Sequence[int], dist: str = "mse", min_std: float = 0.1, init_std: float = 0.0,
                 **kwargs):
        super().__init__(**kwargs)
        self._shape = tuple(shape)
        self._dist = _check("dist", dist, self.KINDS)
        self._min_std, self._init_std = min_std, init_std
        size = int(np.prod(self._shape)) if self._shape else 1
        self._out = keras.layers.Dense(size, dtype="float32")
        self._std = keras.layers.Dense(size, dtype="float32") if dist == "trunc_normal" else None

    def call(self, x: tf.Tensor):
        out = tf.reshape(self._out(x), tf.concat([tf.shape(x)[:-1], self._shape], 0))
        if self._dist == "mse":
            return dists.unit_normal(out, len(self._shape))
        if self._dist == "binary":
            return dists.bernoulli(out)
        if self._dist == "onehot":
            return dists.onehot(out)
        std = tf.reshape(self._std(x), tf.shape(out))
        std = 2 * tf.nn.sigmoid((std + self._init_std) / 2) + self._min_std
        return dists.truncated_normal(tf.tanh(out), std)


class MLP(keras.layers.Layer):
    """MLP head: `layers` x `units` hidden layers, then a distribution over `shape`."""

    def __init__(self, shape: Sequence[int], layers: int, units: int, act: str = "elu", norm: str = "none",
                 dist: str = "mse", min_std: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self._hidden = DenseStack([units] * layers, act, norm)
        self._head = DistLayer(shape, dist, min_std)

    def call(self, features: tf.Tensor):
        return self._head(self._hidden(features))


class GRUCell(keras.layers.Layer):
    """GRU whose gates come from one dense layer (with bias), optionally layer-normalized in float32.

    The update gate starts biased towards keeping the state. The layer norm over the gate
    pre-activations is computed in float32 also under mixed precision.
    """

    def __init__(self, size: int, norm: bool = True, update_bias: float = -1.0, **kwargs):
        super().__init__(**kwargs)
        self.size = size
        self._update_bias = update_bias
        self._layer = keras.layers.Dense(3 * size)
        self._norm = keras.layers.LayerNormalization(epsilon=1e-3, dtype="float32") if norm else None

    def call(self, inputs: tf.Tensor, state: tf.Tensor) -> tf.Tensor:
        parts = self._layer(tf.concat([inputs, state], -1))
        if self._norm is not None:
            parts = tf.cast(self._norm(tf.cast(parts, tf.float32)), parts.dtype)
        reset, cand, update = tf.split(parts, 3, -1)
        reset = tf.nn.sigmoid(reset)
        cand = tf.tanh(reset * cand)
        update = tf.nn.sigmoid(update + self._update_bias)
        return update * cand + (1 - update) * state


class RSSM(keras.layers.Layer):
    """Recurrent state-space model with categorical (or Gaussian) stochastic latents.

    A state is a dict: `deter` [B, deter], `stoch` [B, stoch, discrete] (one-hot) or
    [B, stoch] (Gaussian), and the float32 statistics `logit` or `mean`/`std`. `norm` applies
    to the dense layers around the GRU; `gru_norm` layer-normalizes the GRU's gates. With
    `ensemble` > 1 the prior has that many heads and each prior step uses one picked at random
    (the release's EnsembleRSSM); `ensemble_stats` gives all of them.
    """

    def __init__(self, stoch: int = 32, deter: int = 1024, hidden: int = 1024, discrete: int = 32,
                 act: str = "elu", norm: str = "none", gru_norm: bool = True, std_act: str = "sigmoid2",
                 min_std: float = 0.1, ensemble: int = 1, **kwargs):
        super().__init__(**kwargs)
        if int(ensemble) < 1:
            raise ValueError(f"rssm.ensemble must be at least 1, got {ensemble}")
        self.stoch, self.deter, self.discrete = stoch, deter, discrete
        self._std_act = _check("std_act", std_act, CHOICES[r"rssm\.std_act"])
        self._min_std = min_std
        stats = stoch * discrete if discrete else 2 * stoch
        self._img_in = DenseStack([hidden], act, norm)
        self._cell = GRUCell(deter, bool(gru_norm))
        self._img_out = DenseStack([hidden], act, norm)
        self._img_stats = keras.layers.Dense(stats, dtype="float32")
        # Prior heads beyond the first, in dicts: the first keeps its checkpoint names as without an ensemble.
        names = [f"head_{index}" for index in range(1, int(ensemble))]
        self._extra_outs = {name: DenseStack([hidden], act, norm) for name in names}
        self._extra_stats = {name: keras.layers.Dense(stats, dtype="float32") for name in names}
        self.ensemble = int(ensemble)
        self._obs_out = DenseStack([hidden], act, norm)
        self._obs_stats = keras.layers.Dense(stats, dtype="float32")

    @property
    def feat_size(self) -> int:
        return self.stoch * (self.discrete or 1) + self.deter

    def initial(self, batch_size) -> dict[str, tf.Tensor]:
        dtype = self.compute_dtype
        state = {"deter": tf.zeros([batch_size, self.deter], dtype)}
        if self.discrete:
            state["logit"] = tf.zeros([batch_size, self.stoch, self.discrete], tf.float32)
            state["stoch"] = tf.zeros([batch_size, self.stoch, self.discrete], dtype)
        else:
            state["mean"] = tf.zeros([batch_size, self.stoch], tf.float32)
            state["std"] = tf.zeros([batch_size, self.stoch], tf.float32)
            state["stoch"] = tf.zeros([batch_size, self.stoch], dtype)
        return state

    def observe(self, embed: tf.Tensor, action: tf.Tensor, is_first: tf.Tensor,
                state: dict[str, tf.Tensor] | None = None):
        """Posterior and prior states over a sequence; inputs and outputs are [B, T, ...]."""
        if state is None:
            state = self.initial(tf.shape(action)[0])

        def step(carry, inputs):
            *inputs, seed = inputs
            return self.obs_step(carry[0], *inputs, seed=seed)

        inputs = (_time_major(action), _time_major(embed), _time_major(is_first), step_seeds(tf.shape(action)[1]))
        post, prior = tf.scan(step, inputs, (state, state), parallel_iterations=1)
        return _batch_major(post), _batch_major(prior)

    def imagine(self, action: tf.Tensor, state: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Prior states for an action sequence [B, T, A] from a start state [B, ...]."""
        inputs = (_time_major(action), step_seeds(tf.shape(action)[1]))
        prior = tf.scan(lambda prev, inputs: self.img_step(prev, inputs[0], seed=inputs[1]), inputs, state,
                        parallel_iterations=1)
        return _batch_major(prior)

    def obs_step(self, prev_state: dict[str, tf.Tensor], prev_action: tf.Tensor, embed: tf.Tensor,
                 is_first: tf.Tensor, sample: bool = True, seed: tf.Tensor | None = None):
        """Posterior and prior of one step. With `seed` (a stateless seed, int32 [2]) the random draws are
        a function of it; without, they come from TensorFlow's stateful generators."""
        # Episode starts reset the carried state and action to zeros.
        keep = 1.0 - tf.cast(is_first, tf.float32)
        prev_state = {k: v * tf.reshape(tf.cast(keep, v.dtype), [-1] + [1] * (v.shape.rank - 1))
                      for k, v in prev_state.items()}
        prev_action = prev_action * tf.cast(keep, prev_action.dtype)[:, None]
        prior_seed, post_seed = (None, None) if seed is None else tf.unstack(tf.random.split(seed, 2))
        prior = self.img_step(prev_state, prev_action, sample, prior_seed)
        x = tf.concat([prior["deter"], tf.cast(embed, prior["deter"].dtype)], -1)
        stats = self._stats(self._obs_stats(self._obs_out(x)))
        stoch = self._sample(stats, sample, post_seed)
        post = {"deter": prior["deter"], "stoch": stoch, **stats}
        return post, prior

    def img_step(self, prev_state: dict[str, tf.Tensor], prev_action: tf.Tensor,
                 sample: bool = True, seed: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        dtype = self.compute_dtype
        stoch = tf.cast(prev_state["stoch"], dtype)
        stoch = tf.reshape(stoch, [-1, int(np.prod(stoch.shape[1:]))])
        x = self._img_in(tf.concat([stoch, tf.cast(prev_action, dtype)], -1))
        deter = self._cell(x, tf.cast(prev_state["deter"], dtype))
        pick_seed, sample_seed = (None, None) if seed is None else tf.unstack(tf.random.split(seed, 2))
        if self.ensemble == 1:
            stats = self._stats(self._img_stats(self._img_out(deter)))
        else:  # every head, then one picked at random for the whole batch, as the release does
            if pick_seed is None:
                index = tf.random.uniform((), 0, self.ensemble, tf.int32)
            else:
                index = tf.random.stateless_uniform((), pick_seed, 0, self.ensemble, tf.int32)
            stats = {key: tf.gather(value, index) for key, value in self.ensemble_stats(deter).items()}
        return {"deter": deter, "stoch": self._sample(stats, sample, sample_seed), **stats}

    @property
    def prior_heads(self) -> list[tuple[DenseStack, keras.layers.Dense]]:
        """(hidden layer, statistics layer) of each prior head, in number order."""
        return [(self._img_out, self._img_stats)] + [
            (self._extra_outs[f"head_{k}"], self._extra_stats[f"head_{k}"]) for k in range(1, self.ensemble)]

    def ensemble_stats(self, deter: tf.Tensor) -> dict[str, tf.Tensor]:
        """The statistics of every prior head for `deter` [B, deter], stacked: [ensemble, B, ...]."""
        stats = [self._stats(dense(hidden(deter))) for hidden, dense in self.prior_heads]
        return {key: tf.stack([head[key] for head in stats]) for key in stats[0]}

    def get_feat(self, state: Mapping[str, tf.Tensor]) -> tf.Tensor:
        stoch = state["stoch"]
        if self.discrete:
            stoch = tf.reshape(stoch, tf.concat([tf.shape(stoch)[:-2], [self.stoch * self.discrete]], 0))
        return tf.concat([tf.cast(stoch, self.compute_dtype), tf.cast(state["deter"], self.compute_dtype)], -1)

    def get_dist(self, state: Mapping[str, tf.Tensor]):
        if self.discrete:
            return dists.categorical_latent(state["logit"])
        return dists.gaussian_latent(state["mean"], state["std"])

    def kl_loss(self, post: Mapping[str, tf.Tensor], prior: Mapping[str, tf.Tensor], forward: bool = False,
                balance: float = 0.8, free: float = 0.0, free_avg: bool = True):
        """KL balancing (paper Algorithm 2): `balance` of the gradient trains the prior.

        Returns (loss, per-step KL value). balance 0.5 is the plain KL.
        """
        lhs, rhs = (prior, post) if forward else (post, prior)
        mix = balance if forward else 1 - balance
        sg = lambda state: {k: tf.stop_gradient(v) for k, v in state.items()}  # noqa: E731
        kld = lambda a, b: self.get_dist(a).kl_divergence(self.get_dist(b))  # noqa: E731

        def floor(value):
            return tf.maximum(tf.reduce_mean(value), free) if free_avg else tf.reduce_mean(
                tf.maximum(value, free))

        if balance == 0.5:  # as in the release, free nats apply per step here whatever free_avg says
            value = kld(lhs, rhs)
            return tf.reduce_mean(tf.maximum(value, free)), value
        value = kld(lhs, sg(rhs))
        loss = mix * floor(value) + (1 - mix) * floor(kld(sg(lhs), rhs))
        return loss, value

    def _stats(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        if self.discrete:
            return {"logit": tf.reshape(x, [-1, self.stoch, self.discrete])}
        mean, std = tf.split(x, 2, -1)
        std = {
            "softplus": lambda: tf.nn.softplus(std),
            "sigmoid": lambda: tf.nn.sigmoid(std),
            "sigmoid2": lambda: 2 * tf.nn.sigmoid(std / 2),
        }[self._std_act]() + self._min_std
        return {"mean": mean, "std": std}

    def _sample(self, stats: Mapping[str, tf.Tensor], sample: bool, seed: tf.Tensor | None = None) -> tf.Tensor:
        dist = self.get_dist(stats)
        stoch = dist.sample(seed=seed) if sample else dist.mode()
        return tf.cast(stoch, self.compute_dtype)


def step_seeds(steps: tf.Tensor) -> tf.Tensor:
    """One stateless seed (int32 [2]) per step of a scan, drawn fresh on every call.

    The draws inside a scan take these seeds instead of their own stateful seed ops: TensorFlow seeds
    such ops from their position in the graph that holds them, and every scan body is a graph of its own,
    so the draws of different scans (the posterior's in observe, the prior's in imagination) would repeat
    each other's numbers.
    """
    return tf.random.uniform([steps, 2], tf.int32.min, tf.int32.max, tf.int32)


def _time_major(x: tf.Tensor) -> tf.Tensor:
    return tf.transpose(x, [1, 0] + list(range(2, x.shape.rank)))


def _batch_major(state: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {k: _time_major(v) for k, v in state.items()}


class ChannelBias(keras.layers.Layer):
    """Adds one learned bias per channel (last axis), as a convolution's bias does."""

    def build(self, input_shape) -> None:
        self.bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="bias")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return x + tf.cast(self.bias, x.dtype)


class _Composite(keras.layers.Layer):
    """A layer whose sublayers build themselves on first use (inputs are dicts or feature sets)."""

    def build(self, input_shape=None) -> None:
        self.built = True


class Encoder(_Composite):
    """Embeds observations: four stride-2 convs for images, an MLP for vectors."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], cnn_keys: str = ".*", mlp_keys: str = ".*",
                 act: str = "elu", norm: str = "none", cnn_depth: int = 48,
                 cnn_kernels: Sequence[int] = (4, 4, 4, 4), mlp_layers: Sequence[int] = (400, 400, 400, 400),
                 **kwargs):
        super().__init__(**kwargs)
        self.cnn_keys, self.mlp_keys = select_keys(shapes, cnn_keys, mlp_keys)
        self._act = activation(act)
        # Same variables and results as keras.layers.Conv2D(depth, kernel, 2); faster input gradients on CPU.
        self._convs = tuple(convs.StridedConv(2**i * cnn_depth, kernel) for i, kernel in enumerate(cnn_kernels))
        self._conv_norms = tuple(norm_layer(norm) for _ in cnn_kernels)  # tuples: see DenseStack
        self._mlp = DenseStack(mlp_layers, act, norm)

    def call(self, data: Mapping[str, tf.Tensor]) -> tf.Tensor:
        outputs = []
        if self.cnn_keys:
            image = tf.concat([tf.cast(data[k], self.compute_dtype) for k in self.cnn_keys], -1)
            outputs.append(_apply_leading(self._cnn, image, 3))
        if self.mlp_keys:
            vector = tf.concat([tf.cast(data[k], self.compute_dtype) for k in self.mlp_keys], -1)
            outputs.append(self._mlp(vector))
        return tf.concat(outputs, -1)

    def _cnn(self, x: tf.Tensor) -> tf.Tensor:
        for conv, norm in zip(self._convs, self._conv_norms, strict=True):
            x = conv(x)
            if norm is not None:
                x = norm(x)
            x = self._act(x)
        return tf.reshape(x, [tf.shape(x)[0], int(np.prod(x.shape[1:]))])


class Decoder(_Composite):
    """Reconstructs observations from model features as unit-variance Gaussians."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], cnn_keys: str = ".*", mlp_keys: str = ".*",
                 act: str = "elu", norm: str = "none", cnn_depth: int = 48,
                 cnn_kernels: Sequence[int] = (5, 5, 6, 6), mlp_layers: Sequence[int] = (400, 400, 400, 400),
                 **kwargs):
        super().__init__(**kwargs)
        self._shapes = {k: tuple(v) for k, v in shapes.items()}
        self.cnn_keys, self.mlp_keys = select_keys(shapes, cnn_keys, mlp_keys)
        self._act = activation(act)
        channels = sum(self._shapes[k][-1] for k in self.cnn_keys) or 1  # unused without image keys
        depths = [2 ** (len(cnn_kernels) - i - 2) * cnn_depth for i in range(len(cnn_kernels) - 1)] + [channels]
        self._project = keras.layers.Dense(32 * cnn_depth)
        # The first transposed conv sees a 1x1 input, where it equals a dense layer onto a k x k grid
        # plus one bias per channel; TensorFlow's CPU kernel for that shape is over 10x slower than the matmul.
        self._first = (cnn_kernels[0], depths[0])
        self._grid = keras.layers.Dense(cnn_kernels[0] ** 2 * depths[0], use_bias=False)
        self._grid_bias = ChannelBias()
        # TensorFlow's own transposed-conv kernels: sub-pixel (stride-1 conv + depth_to_space) rewrites of
        # these layers measured no faster on CPU (see convs.py).
        self._deconvs = tuple(
            keras.layers.Conv2DTranspose(depth, kernel, 2, dtype="float32" if i == len(depths) - 2 else None)
            for i, (depth, kernel) in enumerate(zip(depths[1:], cnn_kernels[1:], strict=True)))
        self._deconv_norms = tuple(norm_layer(norm) for _ in depths[:-1])  # tuples: see DenseStack
        self._mlp = DenseStack(mlp_layers, act, norm)
        self._mlp_heads = tuple(DistLayer(self._shapes[k], "mse") for k in self.mlp_keys)

    def call(self, features: tf.Tensor) -> dict:
        out = {}
        if self.cnn_keys:
            mean = _apply_leading(self._cnn, features, 1)
            sizes = [self._shapes[k][-1] for k in self.cnn_keys]
            for key, part in zip(self.cnn_keys, tf.split(mean, sizes, -1), strict=True):
                out[key] = dists.unit_normal(part, 3)
        if self.mlp_keys:
            hidden = self._mlp(features)
            out.update({k: head(hidden) for k, head in zip(self.mlp_keys, self._mlp_heads, strict=True)})
        return out

    def _cnn(self, x: tf.Tensor) -> tf.Tensor:
        kernel, depth = self._first
        x = self._grid_bias(tf.reshape(self._grid(self._project(x)), [-1, kernel, kernel, depth]))
        for i, deconv in enumerate([None, *self._deconvs]):
            if deconv is not None:
                x = deconv(x)
            if i < len(self._deconv_norms):
                if self._deconv_norms[i] is not None:
                    x = self._deconv_norms[i](x)
                x = self._act(x)
        return x
