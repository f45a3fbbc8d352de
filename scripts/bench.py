"""Time training updates and policy steps of the agent on synthetic data; print one JSON object.

Examples:
  python scripts/bench.py --configs defaults atari                     # atari sizes, config precision/jit
  python scripts/bench.py --configs defaults atari --jit false --precision 32 --steps 20
  python scripts/bench.py --configs defaults dmc_vision --act continuous:6
  python scripts/bench.py --configs defaults vector --obs vector:4 --act discrete:2

Config names and `--key value` overrides work as in train.py (precision and jit are ordinary
config keys). Bench-only flags (the config's own `steps` key does not matter here):
  --steps N         timed training updates (default 10)
  --warmup N        untimed updates and policy steps first; the first one traces and compiles (default 2)
  --policy_steps N  timed policy steps, mode train, carrying the state, for 1, 4 and 16 envs in one
                    batched call (default 50)
  --obs KEY:SHAPE   observation keys and shapes, e.g. image:64,64,3 vector:24; rank-3 shapes are uint8 images
  --act KIND:N      action space, discrete:N (one-hot) or continuous:N
  --loop N          instead: the real training loop on the config's task for N updates (real envs, replay,
                    one log write and one checkpoint), with seconds per update by part and the fraction
                    of wall clock outside the update at the config's log and checkpoint cadence

Without --obs/--act the spaces follow the task name, without creating an environment:
atari_* image (size, 1 or 3 with atari.grayscale false) and 18 actions; crafter_* image
(size, 3) and 17 actions; dmc_* image (size, 3), a 24-dim proprio vector and 6 continuous
actions (walker sizes); minatar_* image (size, 4) and 6 actions (Breakout); gym_* a 4-dim vector
and 2 actions (CartPole sizes).

Only the JSON result goes to stdout; logs go to stderr. Times are wall-clock milliseconds.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dreamerv2_tf import cli
from dreamerv2_tf import config as configlib
from dreamerv2_tf.tools import flops as flopslib

BENCH_DEFAULTS = {"steps": 10, "warmup": 2, "policy_steps": 50, "loop": 0}
BENCH_MINIMUM = {"steps": 1, "warmup": 0, "policy_steps": 0, "loop": 0}
ACT_KINDS = ("discrete", "continuous")
POLICY_ENVS = (1, 4, 16)  # batch sizes of the timed policy calls
# Spaces by task prefix when --obs/--act are not given: (image channels or None, vectors, act kind, act size).
TASK_SPACES = {
    "atari": ("atari", {}, "discrete", 18),
    "crafter": (3, {}, "discrete", 17),
    "dmc": (3, {"proprio": (24,)}, "continuous", 6),
    "minatar": (4, {}, "discrete", 6),
    "gym": (None, {"vector": (4,)}, "discrete", 2),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def usage() -> str:
    doc = __doc__.split("Only the JSON")[0].rstrip()
    return doc + "\n\n" + cli.usage(prog="bench.py").split("\n", 2)[2]


def split_bench_flags(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Separate bench-only flags from the config flags; the latter are returned as argv for config.parse."""
    flags = cli.split_flags(argv)
    options: dict[str, Any] = dict(BENCH_DEFAULTS, obs=None, act=None)
    for name in BENCH_DEFAULTS:
        if name in flags:
            options[name] = _count(name, flags.pop(name))
    if "obs" in flags:
        options["obs"] = parse_obs(flags.pop("obs"))
    if "act" in flags:
        options["act"] = parse_act(flags.pop("act"))
    rest = []
    for key, values in flags.items():
        rest += [f"--{key}", *values]
    return options, rest


def _count(name: str, values: Sequence[str]) -> int:
    if len(values) != 1:
        raise configlib.ConfigError(f"--{name} needs one integer, got {' '.join(values) or 'nothing'}")
    try:
        value = int(values[0])
    except ValueError:
        raise configlib.ConfigError(f"--{name} needs an integer, got '{values[0]}'") from None
    if value < BENCH_MINIMUM[name]:
        raise configlib.ConfigError(f"--{name} must be at least {BENCH_MINIMUM[name]}, got {value}")
    return value


def parse_obs(values: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """`image:64,64,3 vector:4` -> {'image': (64, 64, 3), 'vector': (4,)}."""
    if not values:
        raise configlib.ConfigError("--obs needs KEY:SHAPE items, e.g. --obs image:64,64,3 vector:4")
    shapes = {}
    for item in values:
        key, sep, dims = item.partition(":")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d)
        except ValueError:
            shape = ()
        if not key or not sep or len(shape) not in (1, 3) or min(shape) < 1:
            raise configlib.ConfigError(f"--obs item '{item}' must be KEY:H,W,C (image) or KEY:N (vector), "
                                        "with positive sizes")
        shapes[key] = shape
    return shapes


def parse_act(values: Sequence[str]) -> tuple[int, bool]:
    """`discrete:18` -> (18, True); `continuous:6` -> (6, False)."""
    item = values[0] if len(values) == 1 else ""
    kind, _, size = item.partition(":")
    if kind not in ACT_KINDS or not size.isdigit() or int(size) < 1:
        raise configlib.ConfigError(f"--act must be discrete:N or continuous:N with N >= 1, got '{' '.join(values)}'")
    return int(size), kind == "discrete"


def task_spaces(config: configlib.Config) -> tuple[dict[str, tuple[int, ...]], int, bool]:
    """Observation shapes and action spec implied by the task name (see the module docstring)."""
    prefix = config.task.partition("_")[0]
    if prefix not in TASK_SPACES:
        raise configlib.ConfigError(f"unknown task '{config.task}': bench infers spaces for "
                                    f"{', '.join(p + '_*' for p in TASK_SPACES)} tasks; otherwise pass --obs and --act")
    channels, vectors, kind, size = TASK_SPACES[prefix]
    if channels == "atari":
        channels = 1 if config.atari.grayscale else 3
    shapes: dict[str, tuple[int, ...]] = {}
    if channels:
        shapes["image"] = (int(config.size[0]), int(config.size[1]), channels)
    shapes.update(vectors)
    return shapes, size, kind == "discrete"


def resolve_spaces(config: configlib.Config, options: Mapping[str, Any]) -> tuple[dict, int, bool]:
    """(observation shapes, action size, discrete?) from --obs/--act, else from the task name."""
    if options["obs"] is not None:
        if options["act"] is None:
            raise configlib.ConfigError("--obs needs --act too, e.g. --act discrete:18 or --act continuous:6")
        return dict(options["obs"]), *options["act"]
    obs_shapes, act_dim, discrete = task_spaces(config)
    if options["act"] is not None:
        act_dim, discrete = options["act"]
    return obs_shapes, act_dim, discrete


def spaces(obs_shapes: Mapping[str, tuple[int, ...]], act_dim: int, discrete: bool) -> tuple[dict, dict]:
    """gymnasium spaces as an environment would report them."""
    from dreamerv2_tf.envs import base

    obs = {key: base.image_space(shape[:2], shape[2]) if len(shape) == 3 else base.vector_space(shape)
           for key, shape in obs_shapes.items()}
    act = base.discrete_act_space(act_dim) if discrete else base.continuous_act_space(act_dim)
    return {**obs, **base.flag_spaces()}, act


def synthetic_batch(obs_shapes: Mapping[str, tuple[int, ...]], act_dim: int, discrete: bool, batch: int,
                    length: int, seed: int = 0) -> dict[str, Any]:
    """A replay-like batch [batch, length, ...] with the dtypes the replay yields."""
    import numpy as np

    rng = np.random.default_rng(seed)
    data = {}
    for key, shape in obs_shapes.items():
        if len(shape) == 3:
            data[key] = rng.integers(0, 256, (batch, length, *shape), dtype=np.uint8)
        else:
            data[key] = rng.normal(size=(batch, length, *shape)).astype(np.float32)
    if discrete:
        data["action"] = np.eye(act_dim, dtype=np.float32)[rng.integers(0, act_dim, (batch, length))]
    else:
        data["action"] = rng.uniform(-1, 1, (batch, length, act_dim)).astype(np.float32)
    data["reward"] = rng.normal(size=(batch, length)).astype(np.float32)
    data["is_first"] = np.zeros((batch, length), bool)
    data["is_first"][:, 0] = True
    data["is_last"] = np.zeros((batch, length), bool)
    data["is_terminal"] = np.zeros((batch, length), bool)
    return data


def policy_stepper(agent: Any, obs_shapes: Mapping[str, tuple[int, ...]], act_dim: int, discrete: bool,
                   envs: int, seed: int) -> Any:
    """A function that takes one `train`-mode policy step for `envs` envs, carrying the state, on a few
    distinct observations in turn; the first step sets is_first."""
    import numpy as np

    frames = synthetic_batch(obs_shapes, act_dim, discrete, envs, 8, seed)
    observations = [{k: frames[k][:, t] for k in obs_shapes} for t in range(8)]
    carried = {"state": None, "count": 0}

    def step() -> None:
        obs = dict(observations[carried["count"] % len(observations)],
                   is_first=np.full(envs, carried["state"] is None))
        _, carried["state"] = agent.policy(obs, carried["state"], mode="train")
        carried["count"] += 1

    return step


def _timed(fn, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def device_name() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name) for gpu in gpus]
        return "GPU: " + ", ".join(names)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {model} x {cores} cores"


def matmul_flops_per_s(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one large float32 matmul on the default device: what this machine's TensorFlow reaches
    on its best-case kernel, the practical ceiling for the update's achieved FLOP/s."""
    import tensorflow as tf

    a = tf.random.stateless_normal((size, size), [0, 1])
    matmul = tf.function(lambda: tf.reduce_sum(tf.matmul(a, a)))
    matmul().numpy()  # trace and warm up
    best = min(_timed(lambda: matmul().numpy(), repeats)) / 1000.0
    return 2 * size**3 / best


def peak_memory_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _stats(times: Sequence[float], keys: Sequence[str]) -> dict[str, float] | None:
    if not times:
        return None
    values = {"median": statistics.median(times), "min": min(times), "mean": statistics.fmean(times),
              "max": max(times)}
    return {key: round(values[key], 3) for key in keys}


def bench(config: configlib.Config, names: Sequence[str], options: Mapping[str, Any]) -> dict[str, Any]:
    """Build the agent, time updates and policy steps; the result as a JSON-ready dict."""
    import keras
    import numpy as np
    import tensorflow as tf

    from dreamerv2_tf.algo.agent import Agent, resolve_jit, set_precision

    obs_shapes, act_dim, discrete = resolve_spaces(config, options)
    batch, length, horizon = config.dataset.batch, config.dataset.length, config.imag_horizon
    flops = flopslib.update_flops(config, obs_shapes, act_dim, discrete)  # also validates the key patterns
    load_start = os.getloadavg()[0]

    keras.utils.set_random_seed(config.seed)
    precision = set_precision(config.precision)
    obs_space, act_space = spaces(obs_shapes, act_dim, discrete)
    log(f"bench: building agent ({', '.join(names)}; precision {precision}, jit {config.jit}; "
        f"obs {obs_shapes}, {'discrete' if discrete else 'continuous'} actions {act_dim})")
    agent = Agent(obs_space, act_space, config, precision)
    data = {k: tf.constant(v) for k, v in synthetic_batch(obs_shapes, act_dim, discrete, batch, length,
                                                          config.seed).items()}

    last: dict[str, Any] = {}

    def update():
        # Fetch every output so asynchronous devices have finished the update.
        last.update({k: v.numpy() for k, v in agent.train(data)[0].items()})

    compile_s = None
    if options["warmup"]:
        log(f"bench: {options['warmup']} warmup update(s); the first traces and compiles")
        warm = _timed(update, options["warmup"])
        compile_s = round(warm[0] / 1000.0, 3)
    log(f"bench: timing {options['steps']} update(s) of batch {batch} x length {length}")
    train_ms = _timed(update, options["steps"])
    if not all(np.isfinite(value).all() for value in last.values()):
        log("bench: warning: non-finite training metrics on synthetic data")

    policy_ms: dict[int, list[float]] = {envs: [] for envs in POLICY_ENVS}
    if options["policy_steps"]:
        for envs in POLICY_ENVS:
            step = policy_stepper(agent, obs_shapes, act_dim, discrete, envs, config.seed + 1)
            _timed(step, max(1, options["warmup"]))
            log(f"bench: timing {options['policy_steps']} policy step(s) for {envs} env(s)")
            policy_ms[envs] = _timed(step, options["policy_steps"])

    median_s = statistics.median(train_ms) / 1000.0
    matmul = matmul_flops_per_s()
    return {
        "config": list(names),
        "task": config.task,
        "precision": precision,
        "jit": resolve_jit(config.jit),
        "batch": batch,
        "length": length,
        "imag_horizon": horizon,
        "obs_shapes": {k: list(v) for k, v in obs_shapes.items()},
        "act_dim": act_dim,
        "discrete": discrete,
        "params": agent.param_counts(),
        "steps": options["steps"],
        "warmup": options["warmup"],
        "compile_s": compile_s,
        "train_step_ms": _stats(train_ms, ("median", "min", "mean", "max")),
        "policy_steps": options["policy_steps"],
        "policy_step_ms": _stats(policy_ms[1], ("median", "min", "mean")),
        # One batched policy call for N envs, per env: what an env step costs the agent with N envs.
        "policy_ms_per_env_step": {str(envs): round(statistics.median(times) / envs, 3)
                                   for envs, times in policy_ms.items() if times},
        "imagined_states_per_s": round(batch * length * horizon / median_s, 1),
        "replayed_steps_per_s": round(batch * length / median_s, 1),
        "flops_per_update": flops["total"],
        "flops_parts": {k: v for k, v in flops.items() if k != "total"},
        "achieved_flops_per_s": round(flops["total"] / median_s),
        "matmul_flops_per_s": round(matmul),
        "fraction_of_matmul": round(flops["total"] / median_s / matmul, 3),
        "policy_flops_per_step": flopslib.policy_flops(config, obs_shapes, act_dim, discrete),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "device": device_name(),
        "load_avg_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }


def bench_training_loop(config: configlib.Config, names: Sequence[str], options: Mapping[str, Any]) -> dict:
    """`--loop N`: the training loop's own timings (tools/loopbench.py) and what they were measured on."""
    import keras
    import tensorflow as tf

    from dreamerv2_tf.algo.agent import resolve_jit, resolve_precision
    from dreamerv2_tf.tools.loopbench import bench_loop

    load_start = os.getloadavg()[0]
    log(f"bench: the training loop of {config.task} ({', '.join(names)}) for {options['loop']} update(s)")
    loop = bench_loop(config, options["loop"], max(1, options["warmup"]))
    return {"config": list(names), "task": config.task, "precision": resolve_precision(config.precision),
            "jit": resolve_jit(config.jit), "batch": config.dataset.batch, "length": config.dataset.length,
            "train_every": config.train_every, "loop": loop, "device": device_name(),
            "load_avg_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
            "tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version()}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(token in ("-h", "--help") or token.startswith("--help=") for token in argv):
        print(usage())
        sys.exit(0)
    try:
        options, config_argv = split_bench_flags(argv)
        config, loader = cli.parse(config_argv)
        if not loader["print_config"]:
            # Check spaces and key patterns before the slow TensorFlow import.
            flopslib.update_flops(config, *resolve_spaces(config, options))
    except (configlib.ConfigError, ValueError) as exc:
        cli.fail(str(exc))
    if loader["print_config"]:
        print(config.to_yaml(), end="")
        sys.exit(0)
    names = cli.split_flags(config_argv).get("configs") or ["defaults"]
    run = bench if not options["loop"] else bench_training_loop

    # Anything a library prints while benchmarking goes to stderr: stdout carries only the JSON.
    stdout = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)
    try:
        result = run(config, names, options)
    except (configlib.ConfigError, ValueError) as exc:
        cli.fail(str(exc))
    except Exception as exc:
        if type(exc).__name__ != "ResourceExhaustedError":
            raise
        cli.fail(f"out of memory for batch {config.dataset.batch} x length {config.dataset.length}; "
                       "try a smaller --dataset.batch")
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
    print(json.dumps(result))
    sys.exit(0)


if __name__ == "__main__":
    main()
