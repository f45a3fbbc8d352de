"""Model FLOPs and parameter counts from layer shapes, without building any TensorFlow graph.

Conventions and approximations:

- One multiply-add counts as 2 FLOPs. Only matrix multiplies and convolutions are
  counted; bias adds, activations, layer norm, gate arithmetic of the GRU,
  sampling, KL divergences, losses, the lambda-return scan and the optimizer
  update are ignored (together a few percent for the configured sizes).
- Dense: 2 * in * out per example. Conv2D with `valid` padding (Keras' default,
  used by the encoder): 2 * out_h * out_w * k * k * c_in * c_out. Transposed conv
  with `valid` padding (the decoder): every input pixel scatters a k x k x c_out
  patch, so 2 * in_h * in_w * k * k * c_in * c_out; its output side is
  (in - 1) * stride + k. (TensorFlow's profiler estimates transposed convs from the
  output size divided by the stride, which agrees only when out = in * stride.)
- Backward pass: a layer whose weights are trained costs about 2x its forward
  FLOPs (gradients for inputs and for weights), so ~3x forward in total; a layer
  that only passes gradients through (e.g. the world model inside the dynamics
  backprop of the actor) costs about 1x more. Input gradients that TensorFlow
  prunes (first layer of a net fed with data or with stop_gradient features) are
  still counted, so trained parts are slightly overestimated.
- One update = world model on B x L replayed steps (encoder, RSSM posterior step
  which includes the prior step, decoder, reward and discount heads), then
  imagination of H steps from each of the N = B x L posterior states (H prior steps
  and H + 1 actor calls, reward, discount and slow-critic heads on H + 1 states),
  the actor loss (actor and, for Reinforce gradients, the baseline critic on H - 1
  states) and the critic loss (critic on H states). This mirrors
  `WorldModel.imagine` and `ActorCritic.train`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dreamerv2_tf.algo.obs_keys import select_keys


@dataclass(frozen=True)
class Cost:
    """Forward FLOPs per example and trainable parameters of a layer or a stack of layers."""

    flops: int = 0
    params: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.params + other.params)


def total(costs: Sequence[Cost]) -> Cost:
    out = Cost()
    for cost in costs:
        out = out + cost
    return out


# ---------------------------------------------------------------- layer formulas


def dense_flops(in_dim: int, out_dim: int) -> int:
    """Forward FLOPs of a Dense layer for one example."""
    return 2 * int(in_dim) * int(out_dim)


def conv2d_out_size(size: int, kernel: int, stride: int) -> int:
    """Output side of a `valid` convolution."""
    out = (int(size) - int(kernel)) // int(stride) + 1
    if out < 1:
        raise ValueError(f"conv kernel {kernel} does not fit an input of size {size}")
    return out


def conv2d_flops(in_hw: Sequence[int], in_ch: int, out_ch: int, kernel: int, stride: int) -> int:
    """Forward FLOPs of a `valid` Conv2D for one example."""
    out_h, out_w = (conv2d_out_size(side, kernel, stride) for side in in_hw)
    return 2 * out_h * out_w * kernel * kernel * int(in_ch) * int(out_ch)


def conv2d_transpose_out_size(size: int, kernel: int, stride: int) -> int:
    """Output side of a `valid` transposed convolution."""
    return (int(size) - 1) * int(stride) + int(kernel)


def conv2d_transpose_flops(in_hw: Sequence[int], in_ch: int, out_ch: int, kernel: int) -> int:
    """Forward FLOPs of a `valid` Conv2DTranspose for one example (independent of the stride)."""
    return 2 * int(in_hw[0]) * int(in_hw[1]) * kernel * kernel * int(in_ch) * int(out_ch)


def dense(in_dim: int, out_dim: int, bias: bool = True, norm: str = "none") -> Cost:
    params = in_dim * out_dim + (out_dim if bias else 0) + (2 * out_dim if norm == "layer" else 0)
    return Cost(dense_flops(in_dim, out_dim), params)


def dense_stack(in_dim: int, units: Sequence[int], norm: str = "none") -> tuple[Cost, int]:
    """`nets.DenseStack`: (cost, output size)."""
    costs = []
    for size in units:
        costs.append(dense(in_dim, size, norm=norm))
        in_dim = size
    return total(costs), in_dim


def head(in_dim: int, layers: int, units: int, out_size: int, norm: str = "none", dist: str = "mse") -> Cost:
    """`nets.MLP`: hidden layers, then one output projection (two for a truncated normal: mean and std)."""
    hidden, size = dense_stack(in_dim, [units] * layers, norm)
    outputs = 2 if dist == "trunc_normal" else 1
    return total([hidden] + [dense(size, out_size)] * outputs)


# ---------------------------------------------------------------- networks


def encoder(cfg: Mapping[str, Any], obs_shapes: Mapping[str, Sequence[int]]) -> tuple[Cost, int]:
    """`nets.Encoder`: (cost, embedding size). Stride-2 convs with depth cnn_depth * 2**i."""
    cnn, mlp = select_keys(obs_shapes, cfg["cnn_keys"], cfg["mlp_keys"])
    costs, embed = [], 0
    if cnn:
        h, w = obs_shapes[cnn[0]][:2]
        channels = sum(obs_shapes[k][-1] for k in cnn)
        for i, kernel in enumerate(cfg["cnn_kernels"]):
            if min(h, w) < kernel:
                raise ValueError(f"encoder.cnn_kernels {tuple(cfg['cnn_kernels'])}: conv {i + 1} has kernel {kernel} "
                                 f"but a {h}x{w} input; the images {obs_shapes[cnn[0]][:2]} are too small")
            depth = 2**i * cfg["cnn_depth"]
            params = kernel * kernel * channels * depth + depth + (2 * depth if cfg["norm"] == "layer" else 0)
            costs.append(Cost(conv2d_flops((h, w), channels, depth, kernel, 2), params))
            h, w, channels = conv2d_out_size(h, kernel, 2), conv2d_out_size(w, kernel, 2), depth
        embed += h * w * channels
    if mlp:
        cost, size = dense_stack(sum(obs_shapes[k][0] for k in mlp), cfg["mlp_layers"], cfg["norm"])
        costs.append(cost)
        embed += size
    return total(costs), embed


def decoder(cfg: Mapping[str, Any], obs_shapes: Mapping[str, Sequence[int]], feat: int) -> Cost:
    """`nets.Decoder`: a Dense projection to 32 * cnn_depth at 1 x 1, then transposed convs."""
    cnn, mlp = select_keys(obs_shapes, cfg["cnn_keys"], cfg["mlp_keys"])
    costs = []
    if cnn:
        kernels = list(cfg["cnn_kernels"])
        depth = cfg["cnn_depth"]
        channels = sum(obs_shapes[k][-1] for k in cnn)
        depths = [2 ** (len(kernels) - i - 2) * depth for i in range(len(kernels) - 1)] + [channels]
        costs.append(dense(feat, 32 * depth))
        size, in_ch = 1, 32 * depth
        for i, (out_ch, kernel) in enumerate(zip(depths, kernels, strict=True)):
            norm = cfg["norm"] == "layer" and i < len(depths) - 1
            # On its 1x1 input the first transposed conv is a Dense layer onto a k x k grid plus a bias per
            # channel, which is how nets.Decoder implements it: same FLOPs and parameters.
            params = kernel * kernel * in_ch * out_ch + out_ch + (2 * out_ch if norm else 0)
            costs.append(Cost(conv2d_transpose_flops((size, size), in_ch, out_ch, kernel), params))
            size, in_ch = conv2d_transpose_out_size(size, kernel, 2), out_ch
        image = tuple(obs_shapes[cnn[0]][:2])
        if image != (size, size):
            raise ValueError(f"decoder.cnn_kernels {tuple(kernels)} produce {size}x{size} images, but the "
                             f"images are {image[0]}x{image[1]}; use size 64,64 or matching kernels")
    if mlp:
        hidden, size = dense_stack(feat, cfg["mlp_layers"], cfg["norm"])
        costs.append(hidden)
        for key in mlp:
            out = 1
            for dim in obs_shapes[key]:
                out *= int(dim)
            costs.append(dense(size, out))
    return total(costs)


def rssm(cfg: Mapping[str, Any], act_dim: int, embed: int) -> tuple[Cost, Cost, Cost, int]:
    """`nets.RSSM`: (prior step `img_step`, posterior step `obs_step`, the posterior step without the
    prior's own layers as the policy takes it, feature size).

    `obs_step` includes the prior step, so its parameters are those of the whole RSSM.
    """
    stoch, deter, hidden, discrete, norm = cfg["stoch"], cfg["deter"], cfg["hidden"], cfg["discrete"], cfg["norm"]
    stoch_size = stoch * discrete if discrete else stoch
    stats = stoch * discrete if discrete else 2 * stoch
    deter_step = total([
        dense(stoch_size + act_dim, hidden, norm=norm),
        dense(hidden + deter, 3 * deter, norm="layer" if cfg["gru_norm"] else "none"),  # GRU gates, one matmul
    ])
    head = dense(deter, hidden, norm=norm) + dense(hidden, stats)
    prior_head = Cost(head.flops * cfg["ensemble"], head.params * cfg["ensemble"])  # every head runs
    posterior = dense(deter + embed, hidden, norm=norm) + dense(hidden, stats)
    img_step = deter_step + prior_head
    return img_step, img_step + posterior, deter_step + posterior, stoch_size + deter


def _actor_dist(config: Mapping[str, Any], discrete: bool) -> str:
    dist = config["actor"]["dist"]
    if dist == "auto":
        dist = "onehot" if discrete else "trunc_normal"
    return dist


def _actor_grad(config: Mapping[str, Any], discrete: bool) -> str:
    grad = config["actor_grad"]
    if grad == "auto":
        grad = "reinforce" if discrete else "dynamics"
    return grad


def networks(config: Mapping[str, Any], obs_shapes: Mapping[str, Sequence[int]], act_dim: int,
             discrete: bool = True) -> dict[str, Cost]:
    """Per-example forward cost and parameters of every network of the agent."""
    enc, embed = encoder(config["encoder"], obs_shapes)
    img_step, obs_step, act_step, feat = rssm(config["rssm"], act_dim, embed)
    nets = {"encoder": enc, "img_step": img_step, "obs_step": obs_step, "act_step": act_step,
            "decoder": decoder(config["decoder"], obs_shapes, feat)}
    for name in ("reward_head", "discount_head", "critic"):
        cfg = config[name]
        nets[name] = head(feat, cfg["layers"], cfg["units"], 1, cfg["norm"])
    actor = config["actor"]
    nets["actor"] = head(feat, actor["layers"], actor["units"], act_dim, actor["norm"], _actor_dist(config, discrete))
    return nets


def param_counts(config: Mapping[str, Any], obs_shapes: Mapping[str, Sequence[int]], act_dim: int,
                 discrete: bool = True) -> dict[str, int]:
    """Trainable parameters, as `Agent.param_counts` reports them (the slow critic is not trained)."""
    nets = networks(config, obs_shapes, act_dim, discrete)
    model = ["encoder", "obs_step", "decoder", "reward_head"] + (["discount_head"] if config["pred_discount"] else [])
    return {"world_model": sum(nets[name].params for name in model),
            "actor": nets["actor"].params, "critic": nets["critic"].params}


def update_flops(config: Mapping[str, Any], obs_shapes: Mapping[str, Sequence[int]], act_dim: int,
                 discrete: bool = True) -> dict[str, int]:
    """FLOPs of one training update (forward and backward) by part, plus 'world_model', 'behavior', 'total'.

    `config` is the agent config (a `Config` or a plain nested dict); `obs_shapes` maps the model's
    observation keys to their shapes; `act_dim` is the size of the action vector.
    """
    nets = networks(config, obs_shapes, act_dim, discrete)
    batch, length, horizon = config["dataset"]["batch"], config["dataset"]["length"], config["imag_horizon"]
    n = batch * length
    grad = _actor_grad(config, discrete)
    dynamics = grad in ("dynamics", "both")  # gradients flow back through the imagined trajectory
    reinforce = grad in ("reinforce", "both")  # the critic serves as a baseline

    def part(net: str, forward: int, backward: int) -> int:
        """`backward` counts examples in units of one forward pass (2 per trained, 1 per pass-through)."""
        return nets[net].flops * (forward + backward)

    trained = lambda count: (count, 2 * count)  # noqa: E731
    parts = {
        "encoder": part("encoder", *trained(n)),
        "rssm_observe": part("obs_step", *trained(n)),
        "decoder": part("decoder", *trained(n)),
        "reward_head": part("reward_head", *trained(n)),
    }
    if config["pred_discount"]:
        parts["discount_head"] = part("discount_head", *trained(n))
    states = (horizon + 1) * n  # start states plus imagined ones
    through = lambda count: count if dynamics else 0  # noqa: E731
    parts["imagine_rssm"] = part("img_step", horizon * n, through(horizon * n))
    parts["imagine_actor"] = part("actor", states, 2 * through(horizon * n))
    parts["imagine_reward"] = part("reward_head", states, through(states))
    if config["pred_discount"]:
        parts["imagine_discount"] = part("discount_head", states, through(states))
    parts["critic_target"] = part("critic", states, through(states))
    parts["actor_loss"] = part("actor", *trained((horizon - 1) * n))
    if reinforce:
        parts["actor_baseline"] = part("critic", (horizon - 1) * n, 0)
    parts["critic_loss"] = part("critic", *trained(horizon * n))
    model_keys = ("encoder", "rssm_observe", "decoder", "reward_head", "discount_head")
    world_model = sum(value for key, value in parts.items() if key in model_keys)
    behavior = sum(value for key, value in parts.items() if key not in model_keys)
    return {**parts, "world_model": world_model, "behavior": behavior, "total": world_model + behavior}


def policy_flops(config: Mapping[str, Any], obs_shapes: Mapping[str, Sequence[int]], act_dim: int,
                 discrete: bool = True) -> int:
    """Forward FLOPs of one policy step for one environment: encoder, posterior step, actor. The prior's
    own layers are left out: the policy does not use their output, and TensorFlow prunes them from its
    graph (timed: no faster when they are removed from the code)."""
    nets = networks(config, obs_shapes, act_dim, discrete)
    return nets["encoder"].flops + nets["act_step"].flops + nets["actor"].flops
