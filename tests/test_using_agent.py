"""A trained agent from your own code: `load_agent`, repeatable `scripts/eval.py --seed`, and the SavedModel
of `scripts/export.py`, loaded in a process that cannot import this package.

One real CartPole run (scripts/train.py, debug config, about 20 s) is shared by the module; a continuous-
action run is written in-process with the training loop's own checkpointer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import gymnasium as gym
import keras
import numpy as np
import pytest

from dreamerv2_tf import config as configlib
from dreamerv2_tf.envs.configured import run_envs
from dreamerv2_tf.loop import driver as driverlib
from dreamerv2_tf.loop.evaluate import evaluate
from dreamerv2_tf.policy import load_agent
from dreamerv2_tf.tools.export import export

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
DRIVER = driverlib.Driver  # the driver class evaluate() uses, before any test patches it
RUN = ["--configs", "defaults", "debug", "--task", "gym_CartPole-v1", "--steps", "300", "--prefill", "100",
       "--eval_every", "200", "--log_every", "100", "--checkpoint_every", "100"]


def script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("cartpole") / "run"
    result = script("train.py", *RUN, "--logdir", str(logdir))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return logdir


@pytest.fixture(autouse=True)
def float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def recorded_evaluation(monkeypatch, logdir: Path, episodes: int, seed: int) -> tuple[dict, list]:
    """evaluate() (what scripts/eval.py runs) with the episodes its driver finishes recorded."""
    episodes_seen = []

    class Recording(DRIVER):
        def __init__(self, envs, on_episode=(), **kwargs):
            super().__init__(envs, on_episode=[*on_episode, lambda episode, worker: episodes_seen.append(episode)],
                             **kwargs)

    monkeypatch.setattr(driverlib, "Driver", Recording)
    return evaluate(logdir, episodes=episodes, seed=seed), episodes_seen


def play(policy, env, episodes: int, state, mode: str = "eval") -> list[np.ndarray]:
    """Actions of `policy` over whole episodes of a project env, the state carried as the eval driver does."""
    actions = []
    for _ in range(episodes):
        obs = env.reset()
        while not obs["is_last"]:
            action, state = policy.act(obs, state, mode)
            actions.append(action)
            obs = env.step({"action": action})
    return actions


# ---- load_agent ------------------------------------------------------------------------------------------


def test_load_agent_takes_the_actions_of_the_eval_script_with_the_same_seed(cartpole, monkeypatch):
    report, episodes = recorded_evaluation(monkeypatch, cartpole, episodes=3, seed=11)
    evaluated = [int(np.argmax(a)) for episode in episodes for a in episode["action"][1:]]
    policy = load_agent(cartpole)
    assert policy.checkpoint == report["checkpoint"] and policy.discrete and policy.action_size == 2
    env = run_envs(configlib.load_run(cartpole), "eval", 11, 1)[0]
    actions = play(policy, env, 3, policy.initial_state(seed=11))
    env.close()
    assert [int(a) for a in actions] == evaluated and len(evaluated) == sum(report["lengths"])
    # The eval policy samples its latents: another key gives other actions somewhere in these episodes.
    env = run_envs(configlib.load_run(cartpole), "eval", 11, 1)[0]
    others = play(policy, env, 3, policy.initial_state(seed=12))
    env.close()
    assert [int(a) for a in others[:len(evaluated)]] != evaluated


def test_evaluation_with_one_seed_repeats_in_one_process(cartpole, monkeypatch):
    (first, actions1), (second, actions2) = (recorded_evaluation(monkeypatch, cartpole, 2, seed=5) for _ in range(2))
    assert first["returns"] == second["returns"]
    for a, b in zip(actions1, actions2, strict=True):
        np.testing.assert_array_equal(a["action"], b["action"])


def test_eval_script_with_one_seed_gives_identical_returns_in_two_processes(cartpole, tmp_path):
    reports = []
    for name in ("a.json", "b.json"):
        result = script("eval.py", "--logdir", str(cartpole), "--episodes", "3", "--seed", "4",
                        "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr[-2000:]
        assert "gpu_memory: all (no GPU visible)" in result.stdout
        reports.append(json.loads((tmp_path / name).read_text()))
    assert reports[0]["returns"] == reports[1]["returns"] and reports[0]["lengths"] == reports[1]["lengths"]


def test_load_agent_reads_gymnasium_observations_batches_and_checkpoint_paths(cartpole):
    from_checkpoint = load_agent(cartpole / "checkpoints" / "ckpt-200")
    assert from_checkpoint.checkpoint.endswith("ckpt-200")
    assert load_agent(cartpole / "checkpoints").checkpoint.endswith("ckpt-300")
    policy = load_agent(cartpole)
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=0)
    state = policy.initial_state(seed=1)
    # A gymnasium array, the project's dict and a batch of one give the same action and state.
    action, after = policy.act(obs, state)
    as_dict, after_dict = policy.act({"vector": obs, "is_first": True}, state)
    batched, _ = policy.act(obs[None], state)
    assert isinstance(action, np.integer) and action == as_dict == batched
    for key in after:
        np.testing.assert_array_equal(after[key], after_dict[key])
    obs, *_ = env.step(action)  # gymnasium takes the action as it is
    # A batch of three: the state's batch size decides, the first row matches the single observation.
    three = policy.initial_state(3, seed=1)
    actions, state3 = policy.act(np.stack([obs] * 3), three)
    assert actions.shape == (3,) and state3["deter"].shape[0] == 3
    with pytest.raises(ValueError, match=r"observation 'vector' has shape \(3,\); the agent reads \(4,\)"):
        policy.act(obs[:3], state)
    with pytest.raises(ValueError, match="a state of batch size 3 needs 3 observations"):
        policy.act(obs, three)
    with pytest.raises(ValueError, match="observation lacks the keys vector"):
        policy.act({"image": obs}, state)


def test_load_agent_refuses_what_is_not_a_trained_run(cartpole, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_agent(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        load_agent(tmp_path)
    copy = tmp_path / "run"
    (copy / "checkpoints").mkdir(parents=True)
    for path in (cartpole / "checkpoints").iterdir():
        (copy / "checkpoints" / path.name).write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="no config.yaml in"):
        load_agent(copy)
    (copy / "config.yaml").write_text((cartpole / "config.yaml").read_text())
    with pytest.raises(FileNotFoundError, match="no readable episode file in .*train_episodes or .*eval_episodes"):
        load_agent(copy)


def test_initial_state_keys_follow_the_seed(cartpole):
    a, b = load_agent(cartpole, seed=3), load_agent(cartpole, seed=3)
    for _ in range(2):  # the same sequence of keys from the same seed
        np.testing.assert_array_equal(a.initial_state()["key"], b.initial_state()["key"])
    assert not np.array_equal(a.initial_state()["key"], a.initial_state()["key"])
    np.testing.assert_array_equal(a.initial_state(seed=9)["key"], b.initial_state(seed=9)["key"])


# ---- the SavedModel ---------------------------------------------------------------------------------------

# Loads the SavedModel with imports of this package (and TFP, which the agent uses) refused, and steps it on
# the observations and is_first flags in a JSON file; prints the actions as JSON.
LOADER = textwrap.dedent("""
    import json, sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("dreamerv2_tf", "tensorflow_probability"):
                raise ImportError(f"{name} is blocked in this process")

    sys.meta_path.insert(0, Refuse())
    try:
        import dreamerv2_tf  # noqa: F401
        sys.exit("dreamerv2_tf was importable")
    except ImportError:
        pass
    import numpy as np
    import tensorflow as tf

    model = tf.saved_model.load(sys.argv[1])
    inputs = json.loads(open(sys.argv[2]).read())
    state = model.signatures["initial_state"](batch_size=tf.constant(len(inputs["is_first"][0]), tf.int32),
                                              seed=tf.constant(inputs["seed"], tf.int64))
    actions = []
    for step, first in enumerate(inputs["is_first"]):
        obs = {key: tf.constant(np.asarray(values[step], dtype=inputs["dtypes"][key]))
               for key, values in inputs["obs"].items()}
        out = model.signatures["step"](**obs, is_first=tf.constant(first), **state)
        state = {key: value for key, value in out.items() if key.startswith("state_")}
        actions.append(out["action"].numpy().tolist())
    print(json.dumps({"actions": actions, "modules": sorted(m for m in sys.modules if m.startswith("dreamerv2"))}))
""")


def saved_model_actions(model: Path, obs: dict[str, np.ndarray], is_first: np.ndarray, seed: int,
                        tmp_path: Path) -> np.ndarray:
    """Actions of the SavedModel in a subprocess that cannot import dreamerv2_tf; obs are [T, N, ...]."""
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"obs": {key: value.tolist() for key, value in obs.items()},
                                  "dtypes": {key: value.dtype.name for key, value in obs.items()},
                                  "is_first": is_first.tolist(), "seed": seed}))
    result = subprocess.run([sys.executable, "-c", LOADER, str(model), str(inputs)], capture_output=True,
                            text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["modules"] == []
    return np.asarray(output["actions"])


def policy_actions(policy, obs: dict[str, np.ndarray], is_first: np.ndarray, seed: int, mode: str) -> np.ndarray:
    state, actions = policy.initial_state(is_first.shape[1], seed=seed), []
    for step in range(len(is_first)):
        action, state = policy.act({**{key: value[step] for key, value in obs.items()}, "is_first": is_first[step]},
                                   state, mode)
        actions.append(action)
    return np.asarray(actions)


def cartpole_inputs(steps: int = 12, batch: int = 2) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    vector = rng.normal(0, 0.5, (steps, batch, 4)).astype(np.float32)
    is_first = np.zeros((steps, batch), bool)
    is_first[0] = is_first[7, 1] = True  # the second row starts a new episode midway
    return {"vector": vector}, is_first


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_saved_model_acts_like_load_agent_without_the_package(cartpole, tmp_path, mode):
    model = tmp_path / "model"
    written = export(cartpole, model, mode)
    assert written["checkpoint"].endswith("ckpt-300")
    assert set(written["step_inputs"]) == {"vector", "is_first", "state_deter", "state_stoch", "state_logit",
                                          "state_action", "state_key"}
    assert written["initial_state_inputs"] == ["batch_size", "seed"]
    obs, is_first = cartpole_inputs()
    exported = saved_model_actions(model, obs, is_first, 21, tmp_path)
    policy = load_agent(cartpole)
    np.testing.assert_array_equal(exported, policy_actions(policy, obs, is_first, 21, mode))
    # The latents (and in train mode the actions) are sampled from the key: another seed acts otherwise.
    assert not np.array_equal(exported, policy_actions(policy, obs, is_first, 22, mode))


def test_export_script_writes_a_model_and_refuses_an_existing_folder(cartpole, tmp_path):
    result = script("export.py", "--logdir", str(cartpole), "--out", str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "model" / "saved_model.pb").is_file()
    assert "step(is_first, state_action, state_deter, state_key, state_logit, state_stoch, vector)" in result.stdout
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no partial folder left
    again = script("export.py", "--logdir", str(cartpole), "--out", str(tmp_path / "model"))
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error: --out") and "is not an empty folder" in again.stderr


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


def test_the_examples_of_the_docs_page_run(cartpole, tmp_path):
    load, _, savedmodel = python_blocks(ROOT / "docs" / "using_agent.md")
    result = subprocess.run([sys.executable, "-c", load.replace('"runs/cartpole"', repr(str(cartpole)))],
                            capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.findall(r"^episode (\d): return \d+\.0$", result.stdout, re.M) == ["0", "1", "2"]
    export(cartpole, tmp_path / "cartpole_policy")
    result = subprocess.run([sys.executable, "-c", savedmodel + "\nprint(action, sorted(state))"],
                            capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.fullmatch(r"[01] \['state_action', 'state_deter', 'state_key', 'state_logit', 'state_stoch'\]\n",
                        result.stdout)


# ---- continuous actions ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pendulum(tmp_path_factory) -> Path:
    """A Pendulum run as the training loop leaves it: config.yaml, an episode and a checkpoint of a fresh agent."""
    import tensorflow as tf

    from dreamerv2_tf.algo.agent import Agent, set_precision
    from dreamerv2_tf.loop.checkpoint import Checkpointer
    from dreamerv2_tf.loop.replay import Replay

    logdir = tmp_path_factory.mktemp("pendulum") / "run"
    config = configlib.build(["defaults", "debug"], {"task": "gym_Pendulum-v1", "logdir": str(logdir),
                                                     "time_limit": 20})
    logdir.mkdir()
    config.save(logdir / "config.yaml")
    env = run_envs(config, "train", 0, 1)[0]
    replay = Replay(logdir / "train_episodes")
    driver = driverlib.Driver([env], on_step=[replay.add_step])
    driver(driverlib.random_policy(env.act_space, 1, 0), episodes=1)
    keras.utils.set_random_seed(0)
    agent = Agent(env.obs_space, env.act_space, config, set_precision("32"))
    env.close()
    step = tf.Variable(20, dtype=tf.int64)
    Checkpointer(logdir / "checkpoints", 1, agent=agent, step=step).save(20)
    return logdir


def test_continuous_actions_load_and_export(pendulum, tmp_path):
    policy = load_agent(pendulum)
    assert not policy.discrete and policy.action_size == 1 and policy.obs_spec == {"vector": ((3,), np.float32)}
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=0)
    action, _ = policy.act(obs, policy.initial_state(seed=0), "train")
    assert action.shape == (1,) and action.dtype == np.float32 and -1 <= action[0] <= 1
    export(pendulum, tmp_path / "model", "train")
    rng = np.random.default_rng(1)
    obs = {"vector": rng.normal(size=(6, 3, 3)).astype(np.float32)}
    is_first = np.zeros((6, 3), bool)
    is_first[0] = True
    exported = saved_model_actions(tmp_path / "model", obs, is_first, 8, tmp_path)
    np.testing.assert_allclose(exported, policy_actions(policy, obs, is_first, 8, "train"), rtol=1e-6, atol=1e-6)
    assert exported.shape == (6, 3, 1) and np.abs(exported).max() <= 1 and exported.std() > 0.01
