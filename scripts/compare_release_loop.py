"""The loop and the replay side by side with the authors' release (PyPI `dreamerv2` 2.2.0).

Two oracles, each run by the release's own code in a process of its own (`--side release`):

- schedule: the release's `train.py` `main()` with its Driver, Replay, Logger, clocks and loop as they are,
  its Agent replaced by a stub that records the agent step of every update, on a deterministic fake env;
  and this project's `Training` with the same stub and env. For each setting of a grid (envs, train_every,
  train_steps, pretrain, prefill, eval_every, eval_eps) the agent steps of the updates and of the eval
  episodes (as written to metrics.jsonl) must be equal.
- replay: the same episode files (several lengths, some shorter than minlen) added to the release's
  `Replay` and to ours; 100,000 sequences drawn from each are described by which episode and start offset
  they begin at, whether they begin inside a window, whether they hold an episode's last step, and their
  is_first pattern. Each feature's total variation distance between ours and the release must be at most
  1.5 times the noise floor: the 95th percentile of the distance between two samples of the release's own
  sequences (a block bootstrap of its real samples, since sequences of one stream are correlated). The
  distance between two real samples of the release is printed beside it.

    python scripts/compare_release_loop.py --release .release            # both, a JSON report; exit 1 on a mismatch
    python scripts/compare_release_loop.py --release .release --only replay --draws 100000

Edits made to the release in memory (its installed files stay as they are): ruamel.yaml's removed
`safe_load`/`safe_dump`, its GPU assert and `experimental_run_functions_eagerly`, and its episode videos
(which it writes through ffmpeg).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
OBS_SIZE = 2  # the fake env's observation: [env id, step]; sequences carry [episode id, step]

# ---- the grid and the fake env, shared by both sides ------------------------------------------------------


def schedule_settings(quick: bool = False) -> list[dict[str, int]]:
    """envs 1, 2, 4, 5 x train_every 1, 5, 16 x train_steps 1, 2 x pretrain 0, 3, with prefill, eval_every and
    eval_eps varied along the grid. `quick`: 16 of the 48 settings that still hold every value of each key."""
    settings = []
    grid = itertools.product((1, 2, 4, 5), (1, 5, 16), (1, 2), (0, 3))
    for index, (envs, every, train_steps, pretrain) in enumerate(grid):
        settings.append({"envs": envs, "train_every": every, "train_steps": train_steps, "pretrain": pretrain,
                         "prefill": (20, 37, 50)[index % 3], "eval_every": (30, 45, 64)[index % 3],
                         "eval_eps": (1, 2, 3, 6)[index % 4], "steps": 160 + 7 * (index % 5)})
    return [setting for index, setting in enumerate(settings) if (index + index // 4) % 3 == 0] if quick else settings


def fake_episode_length(env_id: int, episode: int, train_envs: int) -> int:
    """Episode lengths (agent steps) longer than the sequences. Train envs (created first) differ between envs
    and episodes. Eval episodes all have one length: the release's eval envs are never reset between
    evaluations, so an episode left unfinished by one evaluation would be finished by the next (with other
    weights), which this project does not do (docs/fidelity.md); equal lengths leave none unfinished."""
    return 9 + (5 * env_id + 3 * episode) % 8 if env_id < train_envs else 12


REPLAY_SETTINGS = {  # name: (minlen, maxlen, dataset length, prioritize_ends)
    "atari": (50, 50, 50, True),
    "vector": (1, 32, 32, True),
    "minatar": (1, 16, 16, True),
    "vector_uniform_starts": (1, 32, 32, False),
    "shortened_windows": (10, 30, 20, True),
}
REPLAY_EPISODES = (30, 51, 52, 60, 75, 90, 130, 200, 12, 41)  # steps; some shorter than minlen + 1


def replay_episodes() -> list[dict[str, np.ndarray]]:
    episodes = []
    for index, length in enumerate(REPLAY_EPISODES):
        steps = np.arange(length)
        episodes.append({
            "vector": np.stack([np.full(length, index), steps], -1).astype(np.float32),
            "action": np.eye(2, dtype=np.float32)[steps % 2] * (steps > 0)[:, None],
            "reward": np.ones(length, np.float32), "is_first": steps == 0, "is_last": steps == length - 1,
            "is_terminal": steps == length - 1})
    return episodes


def chunk_features(chunks: Iterator[Mapping[str, np.ndarray]], draws: int) -> dict[str, list]:
    """Per sequence: (episode, start step), starts inside a window, holds an episode's last step, is_first."""
    features: dict[str, list] = {"start": [], "mid_window": [], "episode_end": [], "is_first": []}
    for _ in range(draws):
        chunk = next(chunks)
        features["start"].append(f"{int(chunk['vector'][0, 0])}:{int(chunk['vector'][0, 1])}")
        features["mid_window"].append(str(not chunk["is_first"][0]))
        features["episode_end"].append(str(bool(np.asarray(chunk["is_last"]).any())))
        features["is_first"].append("".join("1" if flag else "0" for flag in chunk["is_first"]))
    return features


# ---- the release's side -------------------------------------------------------------------------------------


def load_train(path: pathlib.Path):
    """The release's train module and `common`, loaded for a CPU and today's libraries (release_side.py);
    the stub agent has no videos to log."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from release_side import load_release_train

    train, common = load_release_train(path)
    common.Logger.video = lambda self, name, value: None
    return train, common


def release_schedule(train, common, setting: Mapping[str, int], logdir: pathlib.Path) -> dict[str, list[int]]:
    import gym

    updates: list[int] = []

    class FakeEnv:  # the release's env protocol
        created = 0

        def __init__(self, *args):
            self.id, FakeEnv.created = FakeEnv.created, FakeEnv.created + 1
            self.episode, self.t, self.length = -1, 0, 0

        obs_space = {"vector": gym.spaces.Box(-np.inf, np.inf, (OBS_SIZE,), np.float32),
                     "reward": gym.spaces.Box(-np.inf, np.inf, (), np.float32),
                     **{key: gym.spaces.Box(0, 1, (), bool) for key in ("is_first", "is_last", "is_terminal")}}
        act_space = {"action": gym.spaces.Discrete(2)}

        def _obs(self, reward: float) -> dict:
            last = self.t >= self.length
            return {"vector": np.array([self.id, self.t], np.float32), "reward": reward, "is_first": self.t == 0,
                    "is_last": last, "is_terminal": last}

        def reset(self):
            self.episode, self.t = self.episode + 1, 0
            self.length = fake_episode_length(self.id, self.episode, setting["envs"])
            return self._obs(0.0)

        def step(self, action):
            self.t += 1
            return self._obs(1.0)

    class StubAgent:
        def __init__(self, config, obs_space, act_space, step):
            self.step = step

        def train(self, data, state=None):
            updates.append(int(self.step))
            return state, {"model_loss": 0.0}

        def policy(self, obs, state=None, mode="train"):
            count = len(obs["is_first"])
            return {"action": np.eye(2, dtype=np.float32)[np.zeros(count, int)]}, state

        def report(self, data):
            return {}

        def save(self, path):
            pass

        def load(self, path):
            pass

    common.Atari = FakeEnv
    train.agent.Agent = StubAgent
    length = 4
    sys.argv = [str(pathlib.Path(train.__file__)), "--configs", "atari", "--task", "atari_fake",
                "--logdir", str(logdir), "--action_repeat", "1", "--time_limit", "0", "--log_every", "100000",
                "--replay.minlen", "1", "--replay.maxlen", str(length), "--dataset.batch", "2",
                "--dataset.length", str(length), "--precision", "32", "--jit", "False",
                "--log_keys_video", "vector", "--envs_parallel", "none",
                *itertools.chain.from_iterable((f"--{key}", str(value)) for key, value in setting.items())]
    with contextlib.redirect_stdout(io.StringIO()):
        train.main()
    return {"updates": updates, "eval_episodes": eval_steps(logdir)}


def release_replay(common, name: str, draws: int, seed: int, directory: pathlib.Path) -> dict[str, list]:
    minlen, maxlen, length, prioritize = REPLAY_SETTINGS[name]
    np.random.seed(seed)  # the release shortens windows with the global generator
    replay = common.Replay(directory, capacity=0, minlen=minlen, maxlen=maxlen, prioritize_ends=prioritize)
    replay._random = np.random.RandomState(seed + 1)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per short episode it refuses
        for episode in replay_episodes():
            replay.add_episode(episode)
    return chunk_features(replay._generate_chunks(length), draws)


def release_side(request: Mapping[str, Any], path: pathlib.Path) -> dict[str, Any]:
    train, common = load_train(path)
    out: dict[str, Any] = {"schedule": [], "replay": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for index, setting in enumerate(request.get("schedule", [])):
            out["schedule"].append(release_schedule(train, common, setting, pathlib.Path(tmp) / f"s{index}"))
        for name in request.get("replay", []):
            out["replay"][name] = [release_replay(common, name, request["draws"], seed,
                                                  pathlib.Path(tmp) / f"{name}{seed}") for seed in (0, 1)]
    return out


# ---- this project's side ----------------------------------------------------------------------------------


def eval_steps(logdir: pathlib.Path) -> list[int]:
    """The step of every eval episode in a metrics.jsonl (one line per episode in both codebases)."""
    steps = []
    for line in (logdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval_return" in record:
            steps.append(int(record["step"]))
    return steps


def our_schedule(setting: Mapping[str, int], logdir: pathlib.Path) -> dict[str, list[int]]:
    import gymnasium
    import tensorflow as tf

    from dreamerv2_tf import config as configlib
    from dreamerv2_tf.algo import agent as agentlib
    from dreamerv2_tf.loop import training

    updates: list[int] = []
    created = [0]

    class FakeEnv(gymnasium.Env):
        observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (OBS_SIZE,), np.float32)
        action_space = gymnasium.spaces.Discrete(2)

        def __init__(self):
            self.id, created[0] = created[0], created[0] + 1
            self.episode, self.t, self.length = -1, 0, 0

        def reset(self, seed=None, options=None):
            self.episode, self.t = self.episode + 1, 0
            self.length = fake_episode_length(self.id, self.episode, setting["envs"])
            return np.array([self.id, 0], np.float32), {}

        def step(self, action):
            self.t += 1
            return np.array([self.id, self.t], np.float32), 1.0, self.t >= self.length, False, {}

    class StubAgent(tf.Module):
        video_keys = ()

        def __init__(self, obs_space, act_space, config, precision=None):
            super().__init__()
            self.step = tf.Variable(0, dtype=tf.int64)

        def train(self, data, env_step=None, state=None):
            updates.append(int(env_step))
            self.step.assign_add(1)
            return {"model_loss": 0.0}, state

        def policy(self, obs, state=None, mode="train"):
            count = len(obs["is_first"])
            return {"action": np.eye(2, dtype=np.float32)[np.zeros(count, int)]}, state

        def report(self, data):
            return {}

        def network_variables(self):
            return []

        def param_counts(self):
            return {}

    length = 4
    config = configlib.build(["defaults"], {
        "logdir": str(logdir), "action_repeat": 1, "time_limit": 0, "log_every": 100000, "checkpoint_every": 0,
        "replay.minlen": 1, "replay.maxlen": length, "dataset.batch": 2, "dataset.length": length,
        "precision": "32", "jit": "false", "log_keys_video": [], **setting})
    original, agentlib.Agent = agentlib.Agent, StubAgent
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            training.train(FakeEnv, config)
    finally:
        agentlib.Agent = original
    end = int(re.search(r"finished at step ([\d,]+)", printed.getvalue()).group(1).replace(",", ""))
    return {"updates": updates, "eval_episodes": eval_steps(logdir), "end": end}


def our_replay(name: str, draws: int, seed: int, directory: pathlib.Path) -> dict[str, list]:
    import warnings

    from dreamerv2_tf.loop.replay import Replay

    minlen, maxlen, length, prioritize = REPLAY_SETTINGS[name]
    replay = Replay(directory, capacity=0, minlen=minlen, maxlen=maxlen, prioritize_ends=prioritize, seed=seed,
                    warn_short=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for episode in replay_episodes():
            replay.add_episode(episode)
    return chunk_features(replay.chunks(length), draws)


# ---- comparing ------------------------------------------------------------------------------------------


def total_variation(first: Sequence[str], second: Sequence[str]) -> float:
    values, inverse = np.unique(np.concatenate([first, second]), return_inverse=True)
    a = np.bincount(inverse[:len(first)], minlength=len(values)) / len(first)
    b = np.bincount(inverse[len(first):], minlength=len(values)) / len(second)
    return float(0.5 * np.abs(a - b).sum())


def noise_floor(first: Sequence[str], second: Sequence[str], sizes: tuple[int, int], seed: int = 0,
                repeats: int = 100, block: int = 100) -> float:
    """The 95th percentile of the total variation distance between two samples of the given sizes of the
    release's sequences, drawn from its two real samples (`first`, `second`) in blocks of consecutive
    sequences: sequences of one stream are not independent (a window spans several), and a block bootstrap
    keeps that, so the floor is the noise of real draws."""
    values, codes = np.unique(np.concatenate([first, second]), return_inverse=True)
    streams = [codes[:len(first)], codes[len(first):]]
    rng = np.random.default_rng(seed)

    def resample(size: int) -> np.ndarray:
        stream = streams[int(rng.integers(0, 2))]
        starts = rng.integers(0, len(stream) - block, -(-size // block))
        picked = np.concatenate([stream[start:start + block] for start in starts])[:size]
        return np.bincount(picked, minlength=len(values)) / size

    distances = [0.5 * np.abs(resample(sizes[0]) - resample(sizes[1])).sum() for _ in range(repeats)]
    return float(np.percentile(distances, 95))


def compare_replay(ours: Mapping[str, list], release: Sequence[Mapping[str, list]]) -> dict[str, Any]:
    report = {}
    for feature in ours:
        pooled = release[0][feature] + release[1][feature]
        distance = total_variation(ours[feature], pooled)
        floor = noise_floor(release[0][feature], release[1][feature], (len(ours[feature]), len(pooled)))
        report[feature] = {"tv": round(distance, 5), "noise_floor": round(floor, 5),
                           "release_vs_release": round(total_variation(release[0][feature], release[1][feature]), 5),
                           "ok": distance <= 1.5 * floor}
    return report


def run_release(request: Mapping[str, Any], path: pathlib.Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        request_file = pathlib.Path(tmp) / "request.json"
        request_file.write_text(json.dumps(request))
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
        result = subprocess.run([sys.executable, __file__, "--side", "release", "--request", str(request_file),
                                 "--release", str(path)], capture_output=True, text=True, env=env)
        if result.returncode:
            raise RuntimeError(f"the release's side failed:\n{result.stderr[-4000:]}")
        return json.loads((pathlib.Path(tmp) / "release.json").read_text())


def compare(path: pathlib.Path, only: str | None = None, draws: int = 100000, quick: bool = False) -> dict[str, Any]:
    request = {"schedule": schedule_settings(quick) if only in (None, "schedule") else [],
               "replay": list(REPLAY_SETTINGS) if only in (None, "replay") else [], "draws": draws}
    release = run_release(request, path)
    report: dict[str, Any] = {"schedule": [], "replay": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (setting, theirs) in enumerate(zip(request["schedule"], release["schedule"], strict=True)):
            ours = our_schedule(setting, pathlib.Path(tmp) / f"s{index}")
            report["schedule"].append({"setting": setting, "updates": len(theirs["updates"]),
                                       "eval_episodes": len(theirs["eval_episodes"]),
                                       "ok": _prefix_equal(ours, theirs)})
            if not report["schedule"][-1]["ok"]:
                report["schedule"][-1].update(ours=ours, release=theirs)
        for name in request["replay"]:
            ours = our_replay(name, draws, 0, pathlib.Path(tmp) / f"replay_{name}")
            report["replay"][name] = compare_replay(ours, release["replay"][name])
    report["ok"] = all(item["ok"] for item in report["schedule"]) and all(
        feature["ok"] for features in report["replay"].values() for feature in features.values())
    return report


def _prefix_equal(ours: Mapping[str, list[int]], theirs: Mapping[str, list[int]]) -> bool:
    """Equal up to our last step: the release plays whole blocks of eval_every steps past `steps`, ours stops."""
    end = ours["end"]
    return all(ours[key] == [step for step in theirs[key] if step <= end] for key in ("updates", "eval_episodes"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", default=str(ROOT / ".release"), help="where the release is installed")
    parser.add_argument("--only", choices=("schedule", "replay"), default=None)
    parser.add_argument("--draws", type=int, default=100000, help="sequences drawn per replay sample")
    parser.add_argument("--quick", action="store_true",
                        help="16 of the 48 settings of the schedule grid, with every value of each key")
    parser.add_argument("--side", choices=("release",), help=argparse.SUPPRESS)
    parser.add_argument("--request", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "release":
        request = json.loads(pathlib.Path(args.request).read_text())
        result = release_side(request, pathlib.Path(args.release))
        (pathlib.Path(args.request).parent / "release.json").write_text(json.dumps(result))
        return
    report = compare(pathlib.Path(args.release), args.only, args.draws, args.quick)
    print(json.dumps(report, indent=1))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
