"""Compare this agent with the authors' release: same weights and batch, same numbers?

    pip install --no-deps --target DIR -r requirements-release.txt     # scripts/setup.sh: DIR = .release
    python scripts/compare_release.py --release DIR --configs defaults atari [--precision 32|16] \\
        [--updates N] [--KEY VALUE ...]

Both agents are built from the same settings (ours from `--configs` and the overrides, as in train.py; the
release's defaults with every shared key set to our value). The release runs in a process of its own
(scripts/release_side.py); its initial weights are copied into ours; both get the same synthetic batch and
the same agent step; every random draw is made deterministic in the same way in both codebases, keeping
the straight-through gradient paths (release_side.replace_sampling_by_modes).

Prints one JSON object: for each quantity (loss terms, KL, latent statistics, imagined trajectories, lambda
targets, actor and critic losses, entropy, the gradients of each module, the weights of each module after one
update and after `--updates` updates; with `rssm.ensemble` > 1 every prior head's statistics, `ensemble/*`;
with `expl_behavior: plan2explore` the intrinsic reward of the task actor's imagined states, the exploration
actor's imagined trajectory, reward, targets and losses, `expl/*`, and the ensemble and exploration actor-critic
weights) the largest absolute difference `abs` and `rel` = abs / (largest absolute value of the release's
tensor); for modules, the largest over their variables and the variable with the largest `rel` (`worst`), over
the entries finite in both (`nonfinite` counts the others). `ok` is true when every tensor is finite and has
rel <= 1e-4 or abs <= 1e-6.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping

import numpy as np
from release_side import gradients, make_batch, observation_space, replace_sampling_by_modes

from dreamerv2_tf import cli
from dreamerv2_tf import config as configlib

REL_TARGET, ABS_TARGET = 1e-4, 1e-6
# Our keys that are the release's keys, as dotted prefixes (a trailing dot) or whole keys.
SHARED = ("rssm.", "encoder.", "decoder.", "reward_head.", "discount_head.", "loss_scales.", "kl.", "model_opt.",
          "actor.", "critic.", "actor_opt.", "critic_opt.", "grad_heads", "pred_discount", "clip_rewards", "discount",
          "discount_lambda", "imag_horizon", "actor_grad", "actor_grad_mix", "actor_ent", "slow_target",
          "slow_target_update", "slow_target_fraction", "dataset.batch", "dataset.length", "expl_behavior",
          "expl_intr_scale", "expl_extr_scale", "expl_opt.", "expl_head.", "disag_target", "disag_log",
          "disag_models", "disag_offset", "disag_action_cond")
# Our keys without a counterpart in the release: the value the release's code has built in.
RELEASE_FIXED = {"rssm.gru_norm": True, "slow_baseline": True, "train_behavior": True}
# Our choices the release lacks.
RELEASE_BEHAVIORS = {"greedy": "greedy", "plan2explore": "Plan2Explore"}  # ours -> its class names
RELEASE_CHOICES = {"expl_behavior": tuple(RELEASE_BEHAVIORS), "disag_target": ("stoch", "deter", "embed", "feat")}


def release_overrides(config: configlib.Config, precision: str) -> dict:
    """The release's config keys (dotted) for our `config`; ConfigError for settings it cannot express."""
    flat = config.flat()
    for key, value in RELEASE_FIXED.items():
        if flat[key] != value:
            raise configlib.ConfigError(f"{key} {flat[key]!r} has no counterpart in the release (it always "
                                        f"behaves as {value!r})")
    for key, choices in RELEASE_CHOICES.items():
        if flat[key] not in choices:
            raise configlib.ConfigError(f"{key} {flat[key]!r} is not compared with the release (compared: "
                                        f"{', '.join(choices)})")
    if precision not in ("32", "16"):
        raise configlib.ConfigError(f"precision {precision} has no counterpart in the release (32 or 16)")
    shared = {k: v for k, v in flat.items() if k not in RELEASE_FIXED and any(
        k == p or (p.endswith(".") and k.startswith(p)) for p in SHARED)}
    shared["expl_behavior"] = RELEASE_BEHAVIORS[shared["expl_behavior"]]
    return {**shared, "precision": int(precision)}


def task_spec(config: configlib.Config) -> dict:
    """Observation shapes and the action of a synthetic stand-in for `config.task`."""
    suite = config.task.split("_")[0]
    height, width = config.size
    if suite == "atari":
        channels = 1 if config.atari.grayscale else 3
        return {"obs": {"image": [height, width, channels]}, "discrete": True,
                "act_dim": 18 if config.atari.all_actions else 6}
    if suite == "crafter":
        return {"obs": {"image": [height, width, 3]}, "discrete": True, "act_dim": 17}
    if suite == "dmc":  # walker: images and proprioceptive vectors, 6 continuous actions
        return {"obs": {"image": [height, width, 3], "orientations": [14], "height": [1], "velocity": [9]},
                "discrete": False, "act_dim": 6}
    return {"obs": {"vector": [4]}, "discrete": True, "act_dim": 2}


# ---- our agent under the release's names ------------------------------------------------------------


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def our_weights(agent) -> dict[str, tuple]:
    """Release name -> (our variable, ours -> release layout, release -> ours layout)."""
    out: dict[str, tuple] = {}

    def add(name: str, layer, to_release: Callable = _identity, to_ours: Callable = _identity) -> None:
        if layer is None:
            return
        for weight in layer.weights:
            out[f"{name}/{weight.name.split('/')[-1]}"] = (weight, to_release, to_ours)

    def stack(name: str, dense_stack, dense: str, norm: str) -> None:
        for i, (layer, norm_layer) in enumerate(zip(dense_stack._dense, dense_stack._norms, strict=True)):
            add(f"{name}/{dense.format(i)}", layer)
            add(f"{name}/{norm.format(i)}", norm_layer)

    def mlp(name: str, module) -> None:
        stack(name, module._hidden, "dense{}", "norm{}")
        add(f"{name}/out/out", module._head._out)
        add(f"{name}/out/std", module._head._std)

    wm, ac = agent.wm, agent.ac
    enc = wm.encoder
    for i, (conv, norm) in enumerate(zip(enc._convs, enc._conv_norms, strict=True)):
        add(f"encoder/conv{i}", conv)
        add(f"encoder/convnorm{i}", norm)
    stack("encoder", enc._mlp, "dense{}", "densenorm{}")
    rssm = wm.rssm
    for ours, theirs in ((rssm._img_in, "img_in"), (rssm._obs_out, "obs_out")):
        add(f"rssm/{theirs}", ours._dense[0])
        add(f"rssm/{theirs}_norm", ours._norms[0])
    for k, (hidden, stats) in enumerate(rssm.prior_heads):  # the release's img_out_k, img_out_norm_k, img_dist_k
        add(f"rssm/img_out_{k}", hidden._dense[0])
        add(f"rssm/img_out_norm_{k}", hidden._norms[0])
        add(f"rssm/img_dist_{k}", stats)
    add("rssm/cell", rssm._cell._layer)
    add("rssm/cell_norm", rssm._cell._norm)
    add("rssm/obs_dist", rssm._obs_stats)
    dec = wm.heads["decoder"]
    if dec.cnn_keys:
        kernel, depth = dec._first
        add("decoder/convin", dec._project)
        # The first transposed conv on its 1x1 input: our dense kernel [in, k*k*out] is its [k, k, out, in] one.
        out["decoder/conv0/kernel"] = (
            dec._grid.kernel, lambda x: x.reshape(-1, kernel, kernel, depth).transpose(1, 2, 3, 0),
            lambda x: x.transpose(3, 0, 1, 2).reshape(x.shape[3], -1))
        add("decoder/conv0", dec._grid_bias)
        for i, (deconv, norm) in enumerate(zip([None, *dec._deconvs], dec._deconv_norms + (None,), strict=True)):
            if deconv is not None:
                add(f"decoder/conv{i}", deconv)
            add(f"decoder/convnorm{i}", norm)
    stack("decoder", dec._mlp, "dense{}", "densenorm{}")
    for key, head in zip(dec.mlp_keys, dec._mlp_heads, strict=True):
        add(f"decoder/dense_{key}/out", head._out)
    for name, head in wm.heads.items():
        if name != "decoder":
            mlp(name, head)
    behaviors = [("", ac)]
    if agent.explorer is not None:
        for k, head in enumerate(agent.explorer.heads.values()):
            mlp(f"expl_ensemble{k}", head)
        behaviors.append(("expl_", agent.explorer.ac))
    for prefix, behavior in behaviors:
        mlp(f"{prefix}actor", behavior.actor)
        mlp(f"{prefix}critic", behavior.critic)
        if behavior.slow_critic is not behavior.critic:
            mlp(f"{prefix}slow_critic", behavior.slow_critic)
    return out


def run_ours(config: configlib.Config, spec: Mapping, release: Mapping, updates: int, env_step: int) -> dict:
    """Our agent with the release's initial weights: the same quantities as release_side.run."""
    import gymnasium as gym
    import tensorflow as tf

    from dreamerv2_tf.algo.agent import Agent, set_precision

    precision = set_precision(config.precision)
    obs_space = observation_space(spec, gym.spaces.Box)
    act_dim = spec["act_dim"]
    action = gym.spaces.Discrete(act_dim) if spec["discrete"] else gym.spaces.Box(-1, 1, (act_dim,), np.float32)
    agent = Agent(obs_space, {"action": action}, config, precision)
    named = our_weights(agent)
    ours_only = sorted(set(named) - {k[5:] for k in release if k.startswith("init/")})
    theirs_only = sorted({k[5:] for k in release if k.startswith("init/")} - set(named))
    if ours_only or theirs_only:
        raise RuntimeError(f"variables differ: only ours {ours_only[:5]}, only the release's {theirs_only[:5]}")
    for name, (variable, _, to_ours) in named.items():
        variable.assign(to_ours(release[f"init/{name}"]).astype(variable.dtype.name if hasattr(
            variable.dtype, "name") else variable.dtype))
    wm, ac = agent.wm, agent.ac
    agent.env_step.assign(env_step)
    batch, length = config.dataset.batch, config.dataset.length
    data = {k: tf.constant(v) for k, v in make_batch(spec, batch, length, config.seed).items()}
    out = {}
    model_names = [k for k in named if k.split("/")[0] in ("encoder", "rssm", *wm.heads)]
    with tf.GradientTape() as tape:
        model_loss, _, outputs, metrics = wm.loss(data)
    scale = 2.0**15 if precision == "16" else 1.0
    grads = gradients(tape, model_loss, [named[k][0] for k in model_names], scale)
    out.update({f"grad/{k}": named[k][1](_numpy(g)) for k, g in zip(model_names, grads, strict=True)})
    out["loss/model"] = model_loss
    out.update({f"loss/{k[:-5]}": v for k, v in metrics.items() if k.endswith("_loss")})
    out.update(embed=outputs["embed"], feat=outputs["feat"])
    kl_value = wm.rssm.get_dist(outputs["post"]).kl_divergence(wm.rssm.get_dist(outputs["prior"]))
    out["kl_value"] = kl_value
    for part in ("post", "prior"):
        out.update({f"{part}/{k}": v for k, v in outputs[part].items()})
    with tf.GradientTape() as actor_tape:
        seq = wm.imagine(ac.actor, outputs["post"], data["is_terminal"], ac.horizon)
        reward = tf.cast(wm.heads["reward"](seq["feat"]).mode(), tf.float32)
        target, _ = ac.target(seq, reward)
        actor_loss, _ = ac.actor_loss(seq, target)
    with tf.GradientTape() as critic_tape:
        critic_loss = ac.critic_loss(seq, target)
    for module, tape_, loss in (("actor", actor_tape, actor_loss), ("critic", critic_tape, critic_loss)):
        names = [k for k in named if k.split("/")[0] == module]
        grads = gradients(tape_, loss, [named[k][0] for k in names], scale)
        out.update({f"grad/{k}": named[k][1](_numpy(g)) for k, g in zip(names, grads, strict=True)})
    out.update({f"imag/{k}": seq[k] for k in ("feat", "action", "discount", "weight")})
    out.update({"imag/reward": reward, "target": target, "loss/actor": actor_loss, "loss/critic": critic_loss,
                "entropy": ac.actor(tf.stop_gradient(seq["feat"][:-2])).entropy()})
    if wm.rssm.ensemble > 1:
        deter = outputs["post"]["deter"]
        stats = wm.rssm.ensemble_stats(tf.reshape(deter, [-1, deter.shape[-1]]))
        out.update({f"ensemble/{k}": tf.reshape(v, [wm.rssm.ensemble, *deter.shape[:2], *v.shape[2:]])
                    for k, v in stats.items()})
    explorer = agent.explorer
    if explorer is not None:
        out["expl/intr_reward"] = explorer.reward(wm, seq)
        expl_seq = wm.imagine(explorer.ac.actor, outputs["post"], data["is_terminal"], explorer.ac.horizon)
        expl_reward = explorer.reward(wm, expl_seq)
        expl_target, _ = explorer.ac.target(expl_seq, expl_reward)
        out.update({"expl/imag_feat": expl_seq["feat"], "expl/reward": expl_reward, "expl/target": expl_target,
                    "expl/loss_actor": explorer.ac.actor_loss(expl_seq, expl_target)[0],
                    "expl/loss_critic": explorer.ac.critic_loss(expl_seq, expl_target)})
    for update in range(updates):
        step_data = data if update == 0 else {k: tf.constant(v) for k, v in make_batch(
            spec, batch, length, config.seed + update).items()}
        agent.train(step_data, env_step + update * config.train_every)
        if update == 0:
            out.update({f"after_1/{k}": to_release(_numpy(v)) for k, (v, to_release, _) in named.items()})
    out.update({f"after_n/{k}": to_release(_numpy(v)) for k, (v, to_release, _) in named.items()})
    return {k: _numpy(v) for k, v in out.items()}


def _numpy(value) -> np.ndarray:
    value = value.numpy() if hasattr(value, "numpy") else value
    return np.asarray(value, np.float32)


# ---- the comparison -------------------------------------------------------------------------------------


def difference(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """abs and rel over the entries finite in both; counts of non-finite entries where there are any."""
    if ours.shape != theirs.shape:
        raise RuntimeError(f"shapes differ: ours {ours.shape}, the release's {theirs.shape}")
    finite = np.isfinite(ours) & np.isfinite(theirs)
    diff = float(np.max(np.abs(ours[finite].astype(np.float64) - theirs[finite]))) if finite.any() else 0.0
    scale = float(np.max(np.abs(theirs[finite]))) if finite.any() else 0.0
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    out = {"abs": diff, "rel": rel, "ok": bool(finite.all() and (rel <= REL_TARGET or diff <= ABS_TARGET))}
    if not finite.all():
        out["nonfinite"] = {"ours": int(np.sum(~np.isfinite(ours))), "release": int(np.sum(~np.isfinite(theirs)))}
    return out


def compare(ours: Mapping, theirs: Mapping) -> dict:
    """Per quantity {abs, rel, ok}; weights and gradients grouped by module (the worst of its variables)."""
    grouped: dict[str, list[dict]] = {}
    for key in sorted(theirs):
        if key.startswith("init/"):
            continue
        if key not in ours:
            raise RuntimeError(f"ours has no '{key}'")
        parts = key.split("/")
        group = "/".join(parts[:2]) if parts[0] in ("grad", "after_1", "after_n") else key
        grouped.setdefault(group, []).append({**difference(ours[key], theirs[key]), "name": key})
    out = {}
    for group, diffs in grouped.items():
        worst = max(diffs, key=lambda d: d["rel"])
        out[group] = {"abs": max(d["abs"] for d in diffs), "rel": worst["rel"], "ok": all(d["ok"] for d in diffs)}
        counts = [d["nonfinite"] for d in diffs if "nonfinite" in d]
        if counts:
            out[group]["nonfinite"] = {side: sum(c[side] for c in counts) for side in ("ours", "release")}
        if len(diffs) > 1:
            out[group]["worst"] = worst["name"].split("/", 1)[1]
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--release", required=True, help="folder the release was installed into with --target")
    parser.add_argument("--updates", type=int, default=3, help="updates in a row after the first comparison")
    parser.add_argument("--env_step", type=int, default=12345, help="agent step of the first update")
    parser.add_argument("--work", default="", help="keep the release's outputs (release.npz) in this folder")
    if any(token in ("-h", "--help") for token in argv):
        print(__doc__)
        sys.exit(0)
    args, rest = parser.parse_known_args(argv)
    if args.updates < 1:
        cli.fail(f"--updates must be at least 1, got {args.updates}")
    if not (pathlib.Path(args.release) / "dreamerv2" / "agent.py").exists():
        cli.fail(f"no dreamerv2 release in {args.release}; install it there with pip --target (see --help)")
    config = cli.from_cli(rest, prog="compare_release.py")
    try:
        release_overrides(config, "32")  # settings checked before TensorFlow loads (it resolves `auto`)
        from dreamerv2_tf.algo.agent import resolve_precision

        precision = resolve_precision(config.precision)
        overrides = release_overrides(config, precision)
    except configlib.ConfigError as exc:
        cli.fail(str(exc))
    spec = task_spec(config)
    with tempfile.TemporaryDirectory(prefix="compare_release_") as temp:
        work = pathlib.Path(args.work or temp)
        work.mkdir(parents=True, exist_ok=True)
        request = {"config": overrides, "spec": spec, "seed": config.seed, "updates": args.updates,
                   "env_step": args.env_step, "train_every": config.train_every}
        (work / "request.json").write_text(json.dumps(request))
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
        side = subprocess.run([sys.executable, str(pathlib.Path(__file__).with_name("release_side.py")),
                               "--release", args.release, "--work", str(work)],
                              capture_output=True, text=True, env=env)
        if side.returncode != 0:
            tail = side.stderr.strip().splitlines()[-1:] or ["no output"]
            print(side.stderr[-4000:], file=sys.stderr)
            cli.fail(f"the release's side failed (exit {side.returncode}): {tail[0]}")
        with np.load(work / "release.npz") as loaded:
            theirs = {k: loaded[k] for k in loaded.files}
    replace_sampling_by_modes()
    ours = run_ours(config, spec, theirs, args.updates, args.env_step)
    quantities = compare(ours, theirs)
    worst = max(quantities, key=lambda k: quantities[k]["rel"])
    print(json.dumps({"configs": config_names(rest), "task": config.task, "precision": precision,
                      "updates": args.updates, "env_step": args.env_step, "ok": all(
                          q["ok"] for q in quantities.values()),
                      "worst": {"quantity": worst, **quantities[worst]}, "quantities": quantities}, indent=1))


def config_names(argv: list[str]) -> list[str]:
    names = cli.split_flags(argv).get("configs", ["defaults"])
    return names or ["defaults"]


if __name__ == "__main__":
    main()
