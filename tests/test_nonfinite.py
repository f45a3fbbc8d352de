"""Runs that refuse to train on NaN or to trust odd files (issue 19, items 3, 4 and 6).

Real `scripts/train.py` runs of the `debug` config on CartPole: invalid hyperparameters, episodes with NaN
rewards, huge rewards that make the losses overflow, junk and odd-shaped episode files, an offline folder
of another action size. Each asserts the exit status, one line without a traceback, and what is on disk.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from gymnasium import spaces

from dreamerv2_tf.loop import divergence, rundir
from dreamerv2_tf.loop import training as trainlib
from dreamerv2_tf.loop.clocks import Clock, Counter
from dreamerv2_tf.loop.episodes import space_signature
from dreamerv2_tf.loop.logger import read_metrics
from dreamerv2_tf.loop.replay import Replay
from dreamerv2_tf.loop.stop import Stop

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"
EVAL_SCRIPT = ROOT / "scripts" / "eval.py"
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
# Evaluations every 100 steps (1 episode each), 10 steps per update, the first update after 100 steps.
CARTPOLE = ["--configs", "defaults", "debug", "--task", "gym_CartPole-v1", "--prefill", "100",
            "--eval_every", "100", "--eval_eps", "1"]
BASE_STEPS = 250
CARTPOLE_SPACES = ({"vector": spaces.Box(-np.inf, np.inf, (4,), np.float32)}, {"action": spaces.Discrete(2)})


def train(logdir: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TRAIN_SCRIPT), *CARTPOLE, "--logdir", str(logdir), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr without TensorFlow's start-up chatter."""
    noise = re.compile(r"^(WARNING: All log messages before absl|[IWE]\d{4} |To enable the following)")
    return [line for line in result.stderr.splitlines() if line.strip() and not noise.match(line)]


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one 'error:' line a failed script prints, with no traceback anywhere."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in stderr_lines(result) if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def warnings_in(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in stderr_lines(result) if "RuntimeWarning" in line]


def snapshot(directory: Path) -> dict[str, str]:
    """Name -> content hash of every file in a directory (a rewritten file changes its hash)."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


def cartpole_episode(length: int, reward: float, actions: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """A CartPole-shaped episode (vector (4,), one-hot actions) as another tool would write it."""
    rng = np.random.default_rng(seed)
    steps = np.arange(length)
    action = np.eye(actions, dtype=np.float32)[rng.integers(0, actions, length)]
    action[0] = 0
    return {"vector": rng.normal(size=(length, 4)).astype(np.float32), "action": action,
            "reward": np.full(length, reward, np.float32), "is_first": steps == 0,
            "is_last": steps == length - 1, "is_terminal": steps == length - 1}


def replay_name(length: int, stamp: str = "99991231T235959.999999") -> str:
    """A name of the replay's own form that sorts after (is newer than) every real episode."""
    return f"{stamp}-{uuid.uuid4().hex}-{length}.npz"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One finished run from a train_episodes/ that already holds three bad files: random bytes whose name
    claims 100 million steps, an episode of another observation shape that sorts newest (the loader used to
    take its shapes from it), and an episode with a NaN reward. Evaluations at steps 100 and 200, a log line
    every 50 steps and a checkpoint at the last step."""
    logdir = tmp_path_factory.mktemp("nonfinite") / "base"
    episodes = logdir / "train_episodes"
    episodes.mkdir(parents=True)
    (episodes / "junk-99999999.npz").write_bytes(np.random.default_rng(0).bytes(3000))
    odd = cartpole_episode(16, 0.0)
    odd["vector"] = np.zeros((16, 7), np.float32)
    np.savez(episodes / replay_name(16), **odd)
    nan = cartpole_episode(16, 0.0)
    nan["reward"][3] = np.nan
    np.savez(episodes / replay_name(16, "99991231T235959.999998"), **nan)
    result = train(logdir, "--steps", str(BASE_STEPS), "--log_every", "50")
    assert result.returncode == 0, result.stderr
    return logdir, result


def copy_run(base_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> Path:
    logdir = tmp_path / "run"
    shutil.copytree(base_run[0], logdir)
    return logdir


# ---- refused at start-up -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--model_opt.lr", "-1"], "model_opt.lr must be a positive number, got -1.0"),
    (["--actor_opt.lr", "inf"], "actor_opt.lr must be a finite number, got inf"),
    (["--critic_opt.lr", "nan"], "critic_opt.lr must be a finite number, got nan"),
    (["--imag_horizon", "0"], "imag_horizon must be at least 1, got 0"),
    (["--steps", "-1"], "steps must be at least 0, got -1"),
    (["--dataset.batch", "0"], "dataset.batch must be at least 1, got 0"),
    (["--dataset.length", "0"], "dataset.length must be at least 1, got 0"),
    (["--discount", "1.5"], "discount must be in (0, 1], got 1.5"),
    (["--model_opt.eps", "-1e-5"], "model_opt.eps must be at least 0"),
    (["--actor_opt.clip", "-1"], "actor_opt.clip must be at least 0"),
    (["--actor_ent", "linear(1e999,0,10)"], "actor_ent must be a finite number"),
    (["--replay.sample", "steps"], "replay.sample must be one of episode, step, got 'steps'"),
])
def test_invalid_hyperparameters_exit_2_with_one_line_before_anything_is_written(tmp_path, flags, message):
    logdir = tmp_path / "run"
    result = train(logdir, *flags, timeout=60)
    assert result.returncode == 2
    assert message in error_line(result)
    assert "prefill" not in result.stdout  # refused before the prefill, not after it
    assert not logdir.exists()


# ---- non-finite losses -------------------------------------------------------------------------------------


def test_nonfinite_loss_stops_the_run_without_saving_and_names_update_terms_and_checkpoint(base_run, tmp_path):
    logdir = copy_run(base_run, tmp_path)
    folder = tmp_path / "episodes"
    folder.mkdir()
    # Finite rewards of 1e38: the squared reward error overflows float32 at the first update.
    for index in range(3):
        np.savez(folder / f"huge_{index}.npz", **cartpole_episode(30, 1e38, seed=index))
    nan = cartpole_episode(30, 0.0)
    nan["reward"][5] = np.nan
    np.savez(folder / "nan_rewards.npz", **nan)
    before = snapshot(logdir / "checkpoints")
    last = read_metrics(logdir)[-1]
    assert last["step"] == BASE_STEPS
    updates = int(last["updates"])  # the updates in the checkpoint, which was saved at the same step

    result = train(logdir, "--steps", "1000", "--replay.directory", str(folder), "--clip_rewards", "identity",
                   "--checkpoint_every", "10")
    assert result.returncode == 1, result.stderr
    line = error_line(result)
    match = re.fullmatch(r"error: training diverged at update (\d+): non-finite (.+); stopped without saving, "
                         r"the last good checkpoint is (.+)", line)
    assert match, line
    assert int(match.group(1)) == updates + 1  # the very first update on the huge rewards
    terms = match.group(2).split(", ")
    assert "reward_loss" in terms and "model_loss" in terms and all(t.endswith(("_loss", "_grad_norm")) for t in terms)
    assert match.group(3) == str(logdir / "checkpoints" / f"ckpt-{BASE_STEPS}")
    # Nothing saved: the last good checkpoint is neither rewritten nor rotated out, no NaN one is added.
    assert snapshot(logdir / "checkpoints") == before
    assert "finished" not in result.stdout
    # The evaluation due at step 200 was done before the restart: the resumed run does not repeat it at once
    # (the next one is due at 300, after the run has stopped).
    assert "eval episode:" not in result.stdout
    # The NaN episode was skipped at load, with a warning naming it.
    skipped = [w for w in warnings_in(result) if "nan_rewards.npz" in w]
    assert len(skipped) == 1 and "non-finite values (NaN or inf) in reward" in skipped[0]


@pytest.mark.slow
def test_huge_learning_rate_stops_at_the_first_nonfinite_update_before_any_checkpoint(tmp_path):
    logdir = tmp_path / "run"
    result = train(logdir, "--steps", "400", "--model_opt.lr", "1e4", "--checkpoint_every", "100", "--eval_eps", "0")
    assert result.returncode == 1, result.stderr
    line = error_line(result)
    assert re.match(r"error: training diverged at update \d+: non-finite .*model_grad_norm", line), line
    assert line.endswith("stopped without saving, no checkpoint had been saved yet")
    assert not list(logdir.glob("checkpoints/ckpt-*"))


@pytest.mark.slow
def test_float16_stops_after_too_many_skipped_updates_in_a_row(tmp_path):
    folder = tmp_path / "episodes"
    folder.mkdir()
    for index in range(3):
        np.savez(folder / f"huge_{index}.npz", **cartpole_episode(30, 1e38, seed=index))
    logdir = tmp_path / "run"
    result = train(logdir, "--steps", "2000", "--replay.directory", str(folder), "--clip_rewards", "identity",
                   "--precision", "16", "--train_every", "5", "--eval_eps", "0")
    assert result.returncode == 1, result.stderr
    line = error_line(result)
    skipped = divergence.MAX_SKIPPED_IN_A_ROW + 1
    # The pretraining update is update 1; each one is skipped, so the run stops at the 21st in a row.
    assert re.match(rf"error: training diverged at update {skipped}: the float16 loss scaler skipped {skipped} "
                    r"updates in a row \(non-finite gradients\) for the model optimizer", line), line


@pytest.mark.slow
def test_eval_refuses_a_checkpoint_with_nonfinite_weights(base_run, tmp_path):
    logdir = copy_run(base_run, tmp_path)
    # A checkpoint as a diverged run would have saved before this project refused to: one weight NaN.
    script = f"""
import tensorflow as tf
from dreamerv2_tf import config as configlib
from dreamerv2_tf.algo.agent import Agent, set_precision
from dreamerv2_tf.loop.checkpoint import Checkpointer
from dreamerv2_tf.envs import make_env
from dreamerv2_tf.envs.configured import env_kwargs
config = configlib.load_run({str(logdir)!r})
set_precision(config.precision)
env = make_env(config.task, seed=0, mode="eval", **env_kwargs(config, "eval"))
agent = Agent(env.obs_space, env.act_space, config)
step = tf.Variable(0, dtype=tf.int64, trainable=False, name="agent_steps")
checkpointer = Checkpointer({str(logdir / "checkpoints")!r}, 3, agent=agent, step=step)
checkpointer.restore()
variable = agent.network_variables()[0]
variable.assign(tf.fill(variable.shape, float("nan")))
print(checkpointer.save({BASE_STEPS + 1}))
"""
    crafted = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, cwd=ROOT,
                             timeout=300)
    assert crafted.returncode == 0, crafted.stderr
    result = subprocess.run([sys.executable, str(EVAL_SCRIPT), "--logdir", str(logdir), "--episodes", "1"],
                            capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    line = error_line(result)
    assert f"ckpt-{BASE_STEPS + 1}" in line and "holds non-finite weights" in line
    assert "episode 1" not in result.stdout and not (logdir / "eval_results.json").exists()


# ---- episode files -----------------------------------------------------------------------------------------


def test_junk_odd_and_nan_files_are_skipped_with_warnings_and_count_no_steps(base_run):
    logdir, result = base_run
    assert "Traceback" not in result.stderr
    assert "continuing at agent step" not in result.stdout  # a fresh run, not one at step 100 million
    assert f"finished at step {BASE_STEPS}" in result.stdout
    assert (logdir / "checkpoints" / f"ckpt-{BASE_STEPS}.index").exists()
    # Log lines at 150, 200, 250; eval lines of the random-action episode after prefill and of the evaluations
    # at 100 and 200.
    assert [record["step"] for record in read_metrics(logdir)] == [100, 100, 150, 200, 200, 250]
    found = warnings_in(result)
    assert len(found) == 3, found
    junk, = (w for w in found if "junk-99999999.npz" in w)
    assert "not an .npz archive" in junk and "pickle" not in junk
    assert any("vector shape (7,) float32 where the environment's spaces have vector shape (4,)" in w for w in found)
    assert any("non-finite values (NaN or inf) in reward" in w for w in found)
    # A resume loads every real episode and counts its steps, none of the bad files'.
    with pytest.warns(RuntimeWarning) as caught:
        replay = Replay(logdir / "train_episodes", signature=space_signature(*CARTPOLE_SPACES))
    assert len(caught) == 3 and replay.num_episodes == len(list((logdir / "train_episodes").glob("*.npz"))) - 3
    counted = rundir.resume_step(logdir / "no_metrics", logdir / "train_episodes", 0, replay.file_lengths())
    assert BASE_STEPS - 50 < counted <= BASE_STEPS  # the episode running at the end is not on disk
    # The random-action episode after prefill and the evaluations at steps 100 and 200.
    assert len(list((logdir / "eval_episodes").glob("*.npz"))) == 3


def test_eval_schedule_continues_after_resume(tmp_path):
    # Eval returns are written at the step they were played.
    (tmp_path / "metrics.jsonl").write_text('{"step": 200, "eval_return": 9.0}\n{"step": 250, "eval_return": 8.0}\n'
                                            '{"step": 300, "train_return": 1.0}\n')
    last = rundir.last_eval_step(tmp_path)
    assert last == 250
    every = Clock(100, catch_up=False, last=last)  # resumed at 260: the next block starts at 350
    assert [every(step) for step in (260, 340, 352, 400, 452)] == [False, False, True, False, True]
    assert rundir.last_eval_step(tmp_path / "none") is None  # a new run evaluates at once
    assert Clock(100, catch_up=False)(120)


def test_offline_folder_of_another_action_size_is_one_line_naming_folder_and_sizes(tmp_path):
    folder = tmp_path / "episodes"
    folder.mkdir()
    for index in range(3):
        np.savez(folder / f"episode_{index}.npz", **cartpole_episode(20, 0.0, actions=5, seed=index))
    logdir = tmp_path / "run"
    result = train(logdir, "--replay.directory", str(folder), "--steps", "400", "--eval_eps", "0")
    assert result.returncode == 2
    line = error_line(result)
    assert str(folder) in line and "action size 5" in line and "action size 2" in line, line
    assert "\x1b" not in line and len(line) < 300
    assert not warnings_in(result)  # one line, not a warning per file first


# ---- units -------------------------------------------------------------------------------------------------


def test_step_counter_counts_only_episodes_the_replay_loaded(tmp_path):
    episodes = tmp_path / "train_episodes"
    episodes.mkdir()
    good = episodes / replay_name(11, "20240101T000000.000000")
    np.savez(good, **cartpole_episode(11, 0.0))
    (episodes / "junk-99999999.npz").write_bytes(b"junk")
    lying = episodes / replay_name(99999999, "20240101T000001.000000")  # a real 11-step episode, wrong name
    np.savez(lying, **cartpole_episode(11, 0.0))
    with pytest.warns(RuntimeWarning, match="junk-99999999.npz"):
        replay = Replay(episodes)
    assert rundir.resume_step(tmp_path, episodes, 0, replay.file_lengths()) == 20  # 2 x (11 - reset step)
    # Without the replay's lengths only names of the replay's own form count, and the junk name never.
    assert rundir.resume_step(tmp_path, episodes, 0) == 10 + 99999998


def test_divergence_check_float32_and_float16_rules():
    check = divergence.DivergenceCheck("32", lambda: "/runs/x/checkpoints/ckpt-500")
    finite = {"model_loss": np.float32(1.0), "model_grad_norm": np.float32(2.0), "actor_ent": np.float32(0.5)}
    assert check(finite, 1) == {"model_loss": 1.0, "model_grad_norm": 2.0, "actor_ent": 0.5}
    check({**finite, "actor_ent": np.float32(np.nan)}, 2)  # not a loss or gradient: logged, not fatal
    with pytest.raises(divergence.Diverged) as caught:
        check({**finite, "kl_loss": np.float32(np.inf), "critic_grad_norm": np.float32(np.nan)}, 3)
    assert str(caught.value) == ("training diverged at update 3: non-finite kl_loss, critic_grad_norm; stopped "
                                 "without saving, the last good checkpoint is /runs/x/checkpoints/ckpt-500")
    assert caught.value.exit_status == 1

    class Weight:  # what check_weights reads of a Keras variable
        def __init__(self, path, value):
            self.path, self.value = path, np.asarray(value, np.float32)

        def numpy(self):
            return self.value

    check.check_weights([Weight("a/kernel", [1.0, 2.0])])
    with pytest.raises(divergence.Diverged, match=r"non-finite weights in 1 variables, e.g. b/bias; stopped"):
        check.check_weights([Weight("a/kernel", [1.0]), Weight("b/bias", [0.0, np.inf])])

    scaled = divergence.DivergenceCheck("16", lambda: None, max_skipped=3)
    skipped = {"model_loss": math.inf, "model_grad_norm": math.nan, "actor_grad_norm": 1.0}
    for update in range(1, 4):  # three skipped updates in a row are tolerated, one good one resets
        scaled(skipped, update)
    scaled({**skipped, "model_grad_norm": 5.0}, 4)
    for update in range(5, 8):
        scaled(skipped, update)
    with pytest.raises(divergence.Diverged, match="update 8: the float16 loss scaler skipped 4 updates in a row.*"
                                                "model optimizer.*no checkpoint had been saved yet"):
        scaled(skipped, 8)


def test_prefill_gives_up_when_every_episode_is_nonfinite(tmp_path):
    replay = Replay(tmp_path)
    nan = cartpole_episode(5, np.nan)

    def driver(policy, steps):  # each call finishes one NaN episode, as a broken env would
        replay.add_episode(nan)
        step.increment(steps)

    driver.reset = lambda: None
    step = Counter(0)
    with pytest.warns(RuntimeWarning, match="not stored"), pytest.raises(ValueError, match="non-finite"):
        trainlib.prefill_replay(driver, None, step, replay, 20, Stop())
    assert replay.refused_episodes == trainlib.PREFILL_REFUSED_LIMIT and not list(tmp_path.glob("*.npz"))


def test_python_api_refuses_invalid_values_before_writing(tmp_path):
    from dreamerv2_tf import config as configlib
    from dreamerv2_tf.loop.training import train

    logdir = tmp_path / "run"
    with pytest.raises(configlib.ConfigError, match="steps"):
        train(config={"logdir": str(logdir), "task": "gym_CartPole-v1"}, steps=-1)
    assert not logdir.exists()
