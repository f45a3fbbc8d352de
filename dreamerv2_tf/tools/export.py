"""A trained run's policy as a TensorFlow SavedModel, loadable with `tf.saved_model.load` alone.

Signatures (all tensors batched along the first axis N, except the key):

- `initial_state(batch_size: int32 [], seed: int64 [])` -> the state before the first step: `state_deter`,
  `state_stoch`, `state_logit` (or `state_mean`, `state_std` for Gaussian latents), `state_action` and
  `state_key` (int32 [2], which seeds the policy's random draws).
- `step(<observation keys>, is_first: bool [N], <the state_* tensors>)` -> `action` (int64 [N] indices for
  discrete actions, float32 [N, A] in [-1, 1] for continuous ones) and the next `state_*` tensors.

Observations enter as the model reads them: images uint8 [N, H, W, C] at the trained size, vectors
float32 [N, D]. The step's mode (eval: the actor's mode; train: sampled actions) is fixed at export.
Only the encoder, the RSSM and the actor are saved, not the optimizers or the rest of the world model.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dreamerv2_tf import cli
from dreamerv2_tf import config as configlib
from dreamerv2_tf.loop import trained

STATE_PREFIX = "state_"
EXPORT_MODES = ("eval", "train")


def export(path: str | Path, out: str | Path, mode: str = "eval") -> dict[str, Any]:
    """Write the SavedModel of the run at `path` (logdir or checkpoint) to the new folder `out`;
    returns what was written: checkpoint, signature inputs and outputs."""
    if mode not in EXPORT_MODES:
        raise ValueError(f"mode must be one of {', '.join(EXPORT_MODES)}, got '{mode}'")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder; choose a new one")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: its folder {out.parent} does not exist")
    logdir, weights = trained.find_run(path)
    config = configlib.load_run(logdir)
    obs_space, act_space = trained.saved_spaces(logdir, config, weights)

    import tensorflow as tf

    from dreamerv2_tf.loop.gpu_memory import configure_gpu_memory

    print(configure_gpu_memory(config.gpu_memory))
    agent, checkpoint = trained.restore_agent(config, obs_space, act_space, weights)
    module = policy_module(agent, trained.model_obs_spec(agent, obs_space), mode)
    signatures = {"step": module.step, "initial_state": module.initial_state}
    # Written beside `out` and renamed when complete, so an interrupted export leaves no half model.
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        tf.saved_model.save(module, str(partial), signatures=signatures)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    describe = lambda fn: sorted(spec.name for spec in tf.nest.flatten(fn.structured_input_signature))  # noqa: E731
    return {"out": str(out), "checkpoint": checkpoint, "mode": mode,
            "step_inputs": describe(module.step), "step_outputs": sorted(module.step.structured_outputs),
            "initial_state_inputs": describe(module.initial_state)}


def policy_module(agent: Any, obs_spec: Mapping[str, tuple[tuple[int, ...], np.dtype]], mode: str) -> Any:
    """A tf.Module holding the policy's networks, with the two signatures as concrete functions."""
    import tensorflow as tf

    from dreamerv2_tf.algo.agent import policy_key

    module = tf.Module()
    # Tracked so that their variables are saved; nothing else of the agent is.
    module.encoder, module.rssm, module.actor = agent.wm.encoder, agent.wm.rssm, agent.ac.actor
    latent_names = sorted(agent.wm.rssm.initial(1))

    def pack(latent, action, key) -> dict[str, tf.Tensor]:
        state = {**latent, "action": action, "key": key}
        return {STATE_PREFIX + name: value for name, value in state.items()}

    def unpack(inputs):
        latent = {name: inputs[STATE_PREFIX + name] for name in latent_names}
        return latent, inputs[STATE_PREFIX + "action"], inputs[STATE_PREFIX + "key"]

    def initial_state(batch_size, seed):
        latent, action, _ = agent.initial_state(batch_size, seed=0)
        return pack(latent, action, policy_key(seed))

    def step(**inputs):
        obs = {key: inputs[key] for key in (*obs_spec, "is_first")}
        action, (latent, action_state, key) = agent._policy_step(obs, unpack(inputs), mode)
        outputs = pack(latent, action_state, key)
        outputs["action"] = tf.argmax(action, -1) if agent.discrete else action
        return outputs

    example = agent.initial_state(1, seed=0)
    state_specs = {name: tf.TensorSpec([None, *value.shape[1:]], value.dtype, name)
                   for name, value in pack(*example).items() if name != STATE_PREFIX + "key"}
    state_specs[STATE_PREFIX + "key"] = tf.TensorSpec([2], tf.int32, STATE_PREFIX + "key")
    obs_specs = {key: tf.TensorSpec([None, *shape], dtype, key) for key, (shape, dtype) in obs_spec.items()}
    obs_specs["is_first"] = tf.TensorSpec([None], tf.bool, "is_first")
    module.step = tf.function(step).get_concrete_function(**obs_specs, **state_specs)
    module.initial_state = tf.function(initial_state).get_concrete_function(
        tf.TensorSpec([], tf.int32, "batch_size"), tf.TensorSpec([], tf.int64, "seed"))
    return module


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="export.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", required=True, help="training logdir, its checkpoints/ or one checkpoint (ckpt-N)")
    parser.add_argument("--out", required=True, help="new folder for the SavedModel")
    parser.add_argument("--mode", default="eval", choices=EXPORT_MODES,
                        help="eval: the actor's mode; train: sampled actions (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        result = export(args.logdir, args.out, args.mode)
    except (configlib.ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        cli.fail(str(exc))
    print(f"exported the {result['mode']} policy of {result['checkpoint']} to {result['out']}")
    print(f"  step({', '.join(result['step_inputs'])}) -> {', '.join(result['step_outputs'])}")
    print(f"  initial_state({', '.join(result['initial_state_inputs'])})")
