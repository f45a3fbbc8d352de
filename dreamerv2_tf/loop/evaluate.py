"""Evaluate a trained run: load its config and latest checkpoint, play episodes with the eval policy."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dreamerv2_tf import cli
from dreamerv2_tf import config as configlib
from dreamerv2_tf.envs.configured import CUSTOM_PREFIX, run_envs


def evaluate(logdir: str | Path, episodes: int = 10, video: str | Path | None = None, seed: int | None = None,
             mode: str = "eval", env_fn: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Run `episodes` episodes of the run in `logdir`; returns summary statistics and per-episode returns.

    Runs trained with `dreamerv2_tf.train(env_fn)` need the same `env_fn` here. SIGINT (Ctrl-C) or SIGTERM
    after an episode finished ends early: the result covers the finished episodes and has `interrupted`,
    `requested` and `signal`.
    """
    logdir = Path(logdir).expanduser()
    config = configlib.load_run(logdir)
    if episodes < 1:
        raise ValueError(f"--episodes must be at least 1, got {episodes}")
    custom = config.task.startswith(CUSTOM_PREFIX)
    if custom and env_fn is None:
        raise ValueError(f"{logdir} trained on an environment passed to dreamerv2_tf.train(env_fn); evaluate it "
                         "in Python with dreamerv2_tf.loop.evaluate.evaluate(logdir, env_fn=...)")

    # Imported after the checks above, so a wrong path fails without waiting for TensorFlow.
    import keras

    from dreamerv2_tf.loop.driver import Driver
    from dreamerv2_tf.loop.gpu_memory import configure_gpu_memory
    from dreamerv2_tf.loop.stop import Stop
    from dreamerv2_tf.loop.trained import restore_agent

    print(configure_gpu_memory(config.gpu_memory))
    seed = config.seed + 2 * 10**4 if seed is None else seed
    keras.utils.set_random_seed(seed)  # Python, NumPy and TensorFlow global seeds, for whatever draws from them
    env = run_envs(config, "eval", seed, 1, env_fn)[0]
    try:
        agent, checkpoint = restore_agent(config, env.obs_space, env.act_space, logdir / "checkpoints")
    except BaseException:
        env.close()
        raise
    finished, frames = [], []  # (return, length) of each finished episode
    key = next(iter(agent.video_keys), None)

    def on_episode(episode, worker):
        if video and key and not frames:
            frames.append(episode[key])
        finished.append((float(np.sum(episode["reward"])), len(episode["reward"]) - 1))  # one step: Ctrl-C safe
        print(f"episode {len(finished)}: return {finished[-1][0]:.1f}, length {finished[-1][1]}", flush=True)

    def policy(obs, state):
        # The policy's own draws (sampled latents, sampled actions) follow the key made from the seed.
        return agent.policy(obs, agent.initial_state(1, seed) if state is None else state, mode)

    driver = Driver([env], on_episode=[on_episode])
    # Ctrl-C (or SIGTERM) ends the episode loop after the current step: the episodes finished so far
    # still make a result. A second signal mid-step raises Aborted.
    with Stop("writing the results of the finished episodes") as stop:
        try:
            driver(policy, episodes=episodes, until=lambda: stop.requested)
        except KeyboardInterrupt:
            if not finished:
                raise
        finally:
            env.close()
    if stop.signum is not None and not finished:
        interrupt = KeyboardInterrupt(f"{signal.Signals(stop.signum).name} before the first episode finished")
        interrupt.signum = stop.signum  # for the exit status
        raise interrupt
    returns, lengths = [item[0] for item in finished], [item[1] for item in finished]
    result = {
        "logdir": str(logdir), "checkpoint": checkpoint, "task": config.task, "episodes": len(returns),
        "mean": float(np.mean(returns)), "std": float(np.std(returns)),
        "min": float(np.min(returns)), "max": float(np.max(returns)),
        "returns": returns, "lengths": lengths,
    }
    if stop.signum is not None:
        result.update(interrupted=True, requested=episodes, signal=signal.Signals(stop.signum).name)
    if video:
        if not frames:
            raise ValueError(f"--video needs an image observation; {config.task} has none in log_keys_video")
        write_video(video, frames[0])
        result["video"] = str(video)
    return result


def unwritable(path: Path) -> str | None:
    """Why a file cannot be written at `path` (without creating it), or None."""
    if path.is_dir():
        return "is a directory"
    if not path.parent.is_dir():
        return f"its directory {path.parent} does not exist"
    try:  # a real write, since permission bits say nothing for root or on a read-only mount
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot write in {path.parent} ({exc.strerror})"
    if path.exists() and not os.access(path, os.W_OK):
        return "is not writable"
    return None


def write_video(path: str | Path, frames: np.ndarray, fps: int = 20) -> None:
    import imageio.v2 as imageio

    frames = np.asarray(frames)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, -1)
    path = Path(path)
    if path.suffix.lower() == ".gif":
        imageio.mimsave(path, list(frames), duration=1000 / fps, loop=0)
    else:
        imageio.mimsave(path, list(frames), fps=fps, macro_block_size=1)


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="eval.py", description=__doc__)
    parser.add_argument("--logdir", required=True, help="training logdir with config.yaml and checkpoints/")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--video", default=None, help="write the first episode as .mp4 or .gif")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the env and of the policy's random draws (default: training seed + 20000)")
    parser.add_argument("--mode", default="eval", choices=("eval", "train"), help="eval: actor mode; train: sample")
    parser.add_argument("--out", default=None, help="JSON results path (default: LOGDIR/eval_results.json)")
    args = parser.parse_args(argv)
    if args.video and Path(args.video).suffix.lower() not in (".gif", ".mp4"):
        cli.fail(f"--video must end in .gif or .mp4, got {args.video}")
    out = Path(args.out).expanduser() if args.out else Path(args.logdir).expanduser() / "eval_results.json"
    # Checked before playing, so the episodes are not played for nothing (without --out a missing logdir
    # is reported by evaluate() instead).
    for flag, path in (("--out", out if args.out or out.parent.is_dir() else None),
                       ("--video", Path(args.video).expanduser() if args.video else None)):
        problem = path and unwritable(path)
        if problem:
            cli.fail(f"{flag} {path}: {problem}")
    try:
        result = evaluate(args.logdir, args.episodes, args.video, args.seed, args.mode)
    except (configlib.ConfigError, FileNotFoundError, ValueError) as exc:
        cli.fail(str(exc))
    except KeyboardInterrupt as exc:  # before the first episode finished, or a second signal (Aborted)
        signum = getattr(exc, "signum", signal.SIGINT)
        cli.fail(f"interrupted ({signal.Signals(signum).name}); no results written", 128 + signum)
    try:
        out.write_text(json.dumps(result, indent=1))
    except OSError as exc:  # e.g. the disk filled up meanwhile: keep the results on stdout
        print(json.dumps(result))
        cli.fail(f"cannot write {out} ({exc.strerror}); the results are printed above", 1)
    print(f"return mean {result['mean']:.2f} std {result['std']:.2f} min {result['min']:.2f} "
          f"max {result['max']:.2f} over {result['episodes']} episodes; results in {out}")
    if result.get("interrupted"):
        cli.fail(f"interrupted ({result['signal']}) after {result['episodes']} of {result['requested']} episodes; "
                 f"their results are above and in {out}", 128 + signal.Signals[result["signal"]])
    sys.exit(0)
