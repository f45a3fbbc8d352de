"""The authors' release (PyPI `dreamerv2` 2.2.0) as an oracle, run in a process of its own.

`scripts/compare_release.py` starts this script with a work folder holding `request.json` (the release's
config overrides, the observation and action spec, the batch seed, the number of updates, the agent step).
It builds the release's agent, runs one batch through its world model and actor-critic, and writes
`release.npz`: the initial weights, the losses and intermediate tensors, the gradients, and the weights
after one update and after `updates` updates. The helpers at the top (synthetic batches, sampling replaced
by modes) are shared with compare_release.py, so both codebases see the same inputs.

The release needs Keras 2, so this process runs on tf-keras (TF_USE_LEGACY_KERAS). Two edits are made to
the release as it is loaded, none to the folder it is installed in:
- newer tf-keras lacks `mixed_precision.experimental`, which the release imports: a small alias module;
- the release's fix "Stop action gradient in reinforce estimator" (March 2022, after 2.2.0) is applied:
  the Reinforce log-probability is taken of `tf.stop_gradient` of the imagined actions, as in ours.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import types
from collections.abc import Mapping

import numpy as np

# The release's Reinforce term before and after its March 2022 fix (it appears twice: reinforce and both).
REINFORCE_BEFORE = "policy.log_prob(seq['action'][1:-1])"
REINFORCE_AFTER = "policy.log_prob(tf.stop_gradient(seq['action'][1:-1]))"


# ---- shared with compare_release.py ------------------------------------------------------------------


def make_batch(spec: Mapping, batch: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """A synthetic replay batch [batch, length, ...] for the observation and action `spec`.

    Episode starts at t = 0 and at one random later step per row; one terminal step per row.
    """
    rng = np.random.default_rng(seed)
    data = {}
    for key, shape in spec["obs"].items():
        if len(shape) == 3:
            data[key] = rng.integers(0, 256, (batch, length, *shape), dtype=np.uint8)
        else:
            data[key] = rng.normal(size=(batch, length, *shape)).astype(np.float32)
    size = spec["act_dim"]
    if spec["discrete"]:
        data["action"] = np.eye(size, dtype=np.float32)[rng.integers(0, size, (batch, length))]
    else:
        data["action"] = rng.uniform(-1, 1, (batch, length, size)).astype(np.float32)
    data["reward"] = rng.normal(size=(batch, length)).astype(np.float32)
    rows = np.arange(batch)
    is_first = np.zeros((batch, length), bool)
    is_first[:, 0] = True
    is_first[rows, rng.integers(1, length, batch)] = True
    is_terminal = np.zeros((batch, length), bool)
    is_terminal[rows, rng.integers(0, length, batch)] = True
    data.update(is_first=is_first, is_last=is_terminal.copy(), is_terminal=is_terminal)
    return data


def observation_space(spec: Mapping, box) -> dict:
    """The observation space of `spec` built from `box` (gym's or gymnasium's Box): uint8 images,
    float vectors, and the reward and episode flags."""
    space = {key: box(0, 255, tuple(shape), np.uint8) if len(shape) == 3 else
             box(-np.inf, np.inf, tuple(shape), np.float32) for key, shape in spec["obs"].items()}
    flag = box(0, 1, (), bool)
    return {**space, "reward": box(-np.inf, np.inf, (), np.float32), "is_first": flag, "is_last": flag,
            "is_terminal": flag}


def replace_sampling_by_modes() -> None:
    """Make every random draw of both agents deterministic and equal in both codebases.

    A Normal or truncated-normal draw becomes the distribution's mode. A one-hot draw becomes a fixed
    pattern of classes that depends only on the position in the batch: an argmax would be deterministic
    too, but at full size some of the thousands of imagined actions sit at near-ties of their logits,
    where rounding differences between the codebases pick different actions. Patched at the level of
    TFP's leaf distributions, so that what the codebases build on top of a draw (straight-through
    gradients, the release's clipping of truncated-normal samples) still runs.
    """
    import tensorflow as tf
    import tensorflow_probability as tfp

    tfd = tfp.distributions

    def mode_sample(self, n, seed=None):
        mode = self._mode()
        return tf.broadcast_to(mode, tf.concat([[n], tf.shape(mode)], 0))

    def pattern_sample(self, n, seed=None):
        logits = self._logits_parameter_no_checks()
        shape = tf.shape(logits)
        classes = shape[-1]
        position = tf.reshape(tf.range(tf.reduce_prod(shape[:-1])), shape[:-1])
        sample = tf.one_hot((position * 7 + 3) % classes, classes, dtype=self.dtype)
        return tf.broadcast_to(sample, tf.concat([[n], shape], 0))

    tfd.OneHotCategorical._sample_n = pattern_sample
    for cls in (tfd.Normal, tfd.TruncatedNormal):
        cls._sample_n = mode_sample

    # The ensemble prior picks its head by a scalar integer draw (the release's stateful, ours stateless):
    # it becomes the last head, so the heads beyond the first are exercised.
    uniform, stateless_uniform = tf.random.uniform, tf.random.stateless_uniform

    def last_of_scalar_int(shape, minval=0, maxval=None, dtype=tf.float32, seed=None, name=None):
        if dtype.is_integer and maxval is not None and tuple(shape) == ():
            return tf.constant(maxval - 1, dtype)
        return uniform(shape, minval, maxval, dtype, seed, name)

    def stateless_last_of_scalar_int(shape, seed, minval=0, maxval=None, dtype=tf.float32, **kwargs):
        if tf.as_dtype(dtype).is_integer and maxval is not None and tuple(shape) == ():
            return tf.constant(maxval - 1, dtype)
        return stateless_uniform(shape, seed, minval, maxval, dtype, **kwargs)

    tf.random.uniform = last_of_scalar_int
    tf.random.stateless_uniform = stateless_last_of_scalar_int


def gradients(tape, loss, variables: list, scale: float) -> list:
    """Gradients of `loss`, computed for `scale` * loss and divided by it again.

    Under mixed float16 both agents scale their losses (by 2**15 at first) so that small gradients in
    float16 layers do not underflow; the compared gradients are computed the same way.
    """
    import tensorflow as tf

    grads = tape.gradient(loss, variables, output_gradients=tf.constant(scale, loss.dtype))
    return [None if g is None else tf.cast(g, tf.float32) / scale for g in grads]


# ---- the release --------------------------------------------------------------------------------------


def load_release(path: str | os.PathLike):
    """Import the release installed (pip --target) in `path`; returns its (agent, common) modules."""
    package = pathlib.Path(path) / "dreamerv2"
    if not (package / "agent.py").exists():
        raise FileNotFoundError(f"no dreamerv2 package in {path}; install it there (requirements-release.txt)")
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path[:0] = [str(package), str(path)]  # the release imports its modules as top-level names
    import tf_keras

    mixed = tf_keras.mixed_precision
    if not hasattr(mixed, "experimental"):
        shim = types.ModuleType("mixed_precision.experimental")
        shim.global_policy, shim.set_policy, shim.Policy = mixed.global_policy, mixed.set_global_policy, mixed.Policy
        mixed.experimental = shim
        sys.modules["tensorflow.keras.mixed_precision.experimental"] = shim
    import common

    agent = load_edited(package / "agent.py", "agent", [(REINFORCE_BEFORE, REINFORCE_AFTER, 2)])
    return agent, common


def load_edited(file: pathlib.Path, name: str, edits) -> types.ModuleType:
    """`file` run as the module `name` (registered in sys.modules) after its (text, replacement, count) edits.
    A text found other than `count` times means the file is not the 2.2.0 release: a one-line error."""
    source = file.read_text()
    for before, after, count in edits:
        if source.count(before) != count:
            first_line = before.strip().splitlines()[0]
            times = "once" if count == 1 else f"{count} times"
            raise RuntimeError(f"{file} is not the 2.2.0 release: {first_line!r} is not in it {times}")
        source = source.replace(before, after)
    module = types.ModuleType(name)
    module.__file__ = str(file)
    sys.modules[name] = module
    exec(compile(source, str(file), "exec"), module.__dict__)
    return module


# The release's train.py asserts a GPU; it trains on CPUs too. Removed from its text as it is loaded.
GPU_ASSERT = "  assert tf.config.experimental.list_physical_devices('GPU'), message\n"


def use_plain_yaml() -> None:
    """ruamel.yaml 0.18 removed the `safe_load` and `safe_dump` the release's train.py calls: plain YAML
    replacements (tuples written as lists)."""
    import ruamel.yaml

    yaml = ruamel.yaml.YAML(typ="safe", pure=True)
    ruamel.yaml.safe_load = yaml.load
    ruamel.yaml.safe_dump = lambda data, stream: yaml.dump(json.loads(json.dumps(data)), stream)


def load_release_train(path: str | os.PathLike, edits: tuple = ()):
    """The release's train.py as a module (its main() not run), without its GPU assert and with `edits`
    ((its text, the replacement), each text found exactly once); returns (train, common)."""
    _, common = load_release(path)
    use_plain_yaml()
    file = pathlib.Path(path) / "dreamerv2" / "train.py"
    train = load_edited(file, "release_train", [(before, after, 1) for before, after in ((GPU_ASSERT, ""), *edits)])
    return train, common


def release_config(common, package: pathlib.Path, overrides: Mapping):
    """The release's defaults with `overrides` (dotted keys) set; keys may be new (loss_scales.image)."""
    import ruamel.yaml

    config = ruamel.yaml.YAML(typ="safe").load((package / "configs.yaml").read_text())["defaults"]
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[leaf] = value
    return common.Config(config)


def named_weights(module, prefix: str) -> dict:
    """The variables of a release module under names of its structure: 'rssm/img_in/kernel', ..."""
    import tf_keras

    out = {}
    if isinstance(module, tf_keras.layers.Layer) and not hasattr(module, "_layer"):
        for weight in module.weights:
            out[f"{prefix}/{weight.name.split('/')[-1].split(':')[0]}"] = weight
        return out
    children = dict(getattr(module, "_modules", {}))
    if hasattr(module, "_cell"):  # the RSSM's GRU: a Keras cell holding a dense layer and a layer norm
        children["cell"] = module._cell._layer
        if module._cell._norm:
            children["cell_norm"] = module._cell._norm
    if getattr(module, "_layer", None) is not None and not hasattr(module, "_cell"):  # NormLayer
        children["_"] = module._layer
    for name, child in children.items():
        out.update(named_weights(child, prefix if name == "_" else f"{prefix}/{name}"))
    return out


def run(work: pathlib.Path, path: str) -> None:
    request = json.loads((work / "request.json").read_text())
    agent_module, common = load_release(path)
    import gym
    import tensorflow as tf
    import tf_keras

    replace_sampling_by_modes()
    config = release_config(common, pathlib.Path(path) / "dreamerv2", request["config"])
    tf.config.run_functions_eagerly(False)
    if config.precision == 16:
        tf_keras.mixed_precision.set_global_policy("mixed_float16")
    spec = request["spec"]
    obs_space = observation_space(spec, gym.spaces.Box)
    if spec["discrete"]:  # one-hot actions, as the release's OneHotAction wrapper describes them
        action = gym.spaces.Box(0, 1, (spec["act_dim"],), np.float32)
        action.n = spec["act_dim"]
    else:
        action = gym.spaces.Box(-1, 1, (spec["act_dim"],), np.float32)
    env_step = int(request["env_step"])
    agnt = agent_module.Agent(config, obs_space, {"action": action}, common.Counter(env_step))
    wm, ac = agnt.wm, agnt._task_behavior
    batch, length = config.dataset.batch, config.dataset.length
    data = {k: tf.constant(v) for k, v in make_batch(spec, batch, length, request["seed"]).items()}
    out = {}

    # World model: losses, latents and gradients (the variables are created by this first call).
    with tf.GradientTape() as tape:
        model_loss, _, outs, metrics = wm.loss(data)
    model_modules = {"encoder": wm.encoder, "rssm": wm.rssm, **{name: head for name, head in wm.heads.items()}}
    model_vars = {k: v for name, module in model_modules.items() for k, v in named_weights(module, name).items()}
    scale = 2.0**15 if config.precision == 16 else 1.0
    grads = gradients(tape, model_loss, list(model_vars.values()), scale)
    out.update({f"grad/{k}": g for k, g in zip(model_vars, grads, strict=True)})
    out["loss/model"] = model_loss
    out.update({f"loss/{k[:-5]}": v for k, v in metrics.items() if k.endswith("_loss")})
    out["kl_value"] = outs["kl"]
    out.update(embed=outs["embed"], feat=outs["feat"])
    for part in ("post", "prior"):
        out.update({f"{part}/{k}": v for k, v in outs[part].items()})

    # Behavior: imagination, returns, actor and critic losses, entropy and gradients.
    with tf.GradientTape() as actor_tape:
        seq = wm.imagine(ac.actor, outs["post"], data["is_terminal"], config.imag_horizon)
        reward = wm.heads["reward"](seq["feat"]).mode()
        seq["reward"], _ = ac.rewnorm(reward)
        target, _ = ac.target(seq)
        actor_loss, _ = ac.actor_loss(seq, target)
    with tf.GradientTape() as critic_tape:
        critic_loss, _ = ac.critic_loss(seq, target)
    behavior_vars = {"actor": named_weights(ac.actor, "actor"), "critic": named_weights(ac.critic, "critic")}
    for name, tape_, loss in (("actor", actor_tape, actor_loss), ("critic", critic_tape, critic_loss)):
        variables = behavior_vars[name]
        grads = gradients(tape_, loss, list(variables.values()), scale)
        out.update({f"grad/{k}": g for k, g in zip(variables, grads, strict=True)})
    out.update({f"imag/{k}": seq[k] for k in ("feat", "action", "reward", "discount", "weight")})
    out.update({"target": target, "loss/actor": actor_loss, "loss/critic": critic_loss,
                "entropy": ac.actor(tf.stop_gradient(seq["feat"][:-2])).entropy()})

    every = {**model_vars, **behavior_vars["actor"], **behavior_vars["critic"]}
    if ac._target_critic is not ac.critic:
        every.update(named_weights(ac._target_critic, "slow_critic"))
    modules = [*model_modules.values(), ac.actor, ac.critic, ac._target_critic]
    if int(config.rssm.ensemble) > 1:  # every prior head on the posterior's deterministic states
        out.update({f"ensemble/{k}": v for k, v in wm.rssm._suff_stats_ensemble(outs["post"]["deter"]).items()})
    if config.expl_behavior == "Plan2Explore":
        expl = agnt._expl_behavior
        out["expl/intr_reward"] = expl._intr_reward(seq)  # the task actor's imagined states; builds the ensemble
        expl_seq = wm.imagine(expl.ac.actor, outs["post"], data["is_terminal"], config.imag_horizon)
        expl_seq["reward"], _ = expl.ac.rewnorm(expl._intr_reward(expl_seq))
        expl_target, _ = expl.ac.target(expl_seq)
        out.update({"expl/imag_feat": expl_seq["feat"], "expl/reward": expl_seq["reward"], "expl/target": expl_target,
                    "expl/loss_actor": expl.ac.actor_loss(expl_seq, expl_target)[0],
                    "expl/loss_critic": expl.ac.critic_loss(expl_seq, expl_target)[0]})
        for k, head in enumerate(expl._networks):
            every.update(named_weights(head, f"expl_ensemble{k}"))
        every.update(named_weights(expl.ac.actor, "expl_actor"))
        every.update(named_weights(expl.ac.critic, "expl_critic"))
        if expl.ac._target_critic is not expl.ac.critic:
            every.update(named_weights(expl.ac._target_critic, "expl_slow_critic"))
        modules += [*expl._networks, expl.ac.actor, expl.ac.critic, expl.ac._target_critic]
    check_complete(every, modules)
    out.update({f"init/{k}": v.numpy() for k, v in every.items()})
    for update in range(int(request["updates"])):
        agnt.tfstep.assign(env_step + update * int(request["train_every"]))
        step_data = data if update == 0 else {k: tf.constant(v) for k, v in make_batch(
            spec, batch, length, request["seed"] + update).items()}
        agnt.train(step_data)
        if update == 0:
            out.update({f"after_1/{k}": v.numpy() for k, v in every.items()})
    out.update({f"after_n/{k}": v.numpy() for k, v in every.items()})
    np.savez(work / "release.npz", **{k: np.asarray(v.numpy() if hasattr(v, "numpy") else v, np.float32)
                                      for k, v in out.items()})


def check_complete(named: Mapping, modules) -> None:
    """Every variable of the release's modules must have a name, or the comparison would miss some."""
    found = {id(v) for v in named.values()}
    missing = [v.name for module in modules for v in module.variables if id(v) not in found]
    if missing:
        raise RuntimeError(f"release variables without a name in the comparison: {missing[:5]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", required=True, help="folder the release was installed into with --target")
    parser.add_argument("--work", required=True, help="folder with request.json; release.npz is written there")
    args = parser.parse_args()
    run(pathlib.Path(args.work), args.release)


if __name__ == "__main__":
    main()
