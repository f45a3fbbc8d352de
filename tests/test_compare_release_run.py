"""The authors' release's own training loop on this project's envs (scripts/compare_release_run.py).

The release is installed into `.release/` by scripts/setup.sh, or wherever DREAMERV2_RELEASE points. Without
it these tests fail, never skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dreamerv2_tf.tools import scores as S

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "compare_release_run.py"
RELEASE = Path(os.environ.get("DREAMERV2_RELEASE", ROOT / ".release"))
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
# Tiny CartPole: prefill 60 random steps, then evaluation at 60 and 160 and training to 260 agent steps
# (the release trains in whole eval_every blocks).
TINY = ["--configs", "defaults", "vector", "debug", "--dataset.chunks", "shared", "--task", "gym_CartPole-v1",
        "--steps", "200", "--prefill", "60", "--eval_every", "100", "--log_every", "50", "--eval_eps", "2",
        "--threads", "1"]


def command(logdir: Path, *args: str, release: Path = RELEASE) -> list[str]:
    if not (release / "dreamerv2" / "train.py").exists():
        pytest.fail(f"the authors' release is not installed in {release}: run scripts/setup.sh, or pip install "
                    f"--no-deps --target {release} -r requirements-release.txt, or set DREAMERV2_RELEASE")
    return [sys.executable, str(SCRIPT), "--release", str(release), "--logdir", str(logdir), *args]


def run(logdir: Path, *args: str, timeout: int = 300, release: Path = RELEASE,
        env: dict = ENV) -> subprocess.CompletedProcess:
    return subprocess.run(command(logdir, *args, release=release), capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def lines(logdir: Path) -> list[dict]:
    return [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_cartpole_run_writes_a_logdir_plot_reads(tmp_path):
    logdir = tmp_path / "seed3"
    result = run(logdir, *TINY, "--seed", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = lines(logdir)
    evals = [line for line in metrics if "eval_return" in line]
    trains = [line for line in metrics if "train_return" in line]
    # The release's prefill logs one random eval episode, then come 2 evaluations of 2 episodes.
    assert [line["step"] for line in evals] == [60, 60, 60, 160, 160]
    assert trains and all(line["train_return"] == line["train_length"] > 0 for line in trains)  # +1 per step
    assert 200 < max(line["step"] for line in metrics) <= 260  # agent steps
    assert any("model_loss" in line for line in metrics)  # the agent trained

    config = yaml.safe_load((logdir / "config.yaml").read_text())
    assert (config["task"], config["seed"], config["precision"]) == ("gym_CartPole-v1", 3, 32)
    # Our config's values under the release's keys.
    assert (config["rssm"]["deter"], config["dataset"]["length"], config["replay"]["maxlen"]) == (32, 10, 10)
    assert config["encoder"]["mlp_layers"] == [32, 32] and config["clip_rewards"] == "identity"
    curve = S.read_curve(logdir)
    assert curve.task == "gym_CartPole-v1" and curve.seed == 3 and curve.step.tolist() == [60.0] * 3 + [160.0] * 2

    spec = importlib.util.spec_from_file_location("plot_script", ROOT / "scripts" / "plot.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    assert plot.main([f"release={logdir}", "--xkey", "step", "--out", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").stat().st_size > 1000

    # The same command on a finished run does nothing.
    before = (logdir / "metrics.jsonl").read_text()
    again = run(logdir, *TINY, "--seed", "3", timeout=60)
    assert again.returncode == 0 and "already holds a finished run" in again.stdout, again.stderr[-2000:]
    assert (logdir / "metrics.jsonl").read_text() == before


def test_settings_the_release_loop_cannot_express_are_one_line_errors(tmp_path):
    for flag, value, words in (("--replay.sample", "step", "replay.sample 'step'"),
                               ("--envs_parallel", "process", "envs_parallel 'process'"),
                               ("--precision", "16", "float32"), ("--rssm.gru_norm", "false", "gru_norm"),
                               ("--dataset.chunks", "stream", "dataset.chunks 'stream'")):
        result = run(tmp_path / "run", "--configs", "defaults", "vector", "--dataset.chunks", "shared", flag, value,
                     timeout=60)
        assert result.returncode == 2, (flag, result.stderr)
        assert result.stderr.startswith("error:") and words in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_release_folder_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--release", str(tmp_path), "--logdir", str(tmp_path / "x"),
                             "--configs", "defaults", "vector"], capture_output=True, text=True, timeout=60, env=ENV,
                            cwd=ROOT)
    assert result.returncode == 2 and result.stderr.startswith("error: no dreamerv2 release"), result.stderr


def test_another_release_version_is_one_line(tmp_path):
    release = tmp_path / "release"
    shutil.copytree(RELEASE / "dreamerv2", release / "dreamerv2")
    train = release / "dreamerv2" / "train.py"
    train.write_text(train.read_text().replace("list_physical_devices('GPU')", "list_physical_devices('TPU')"))
    # The copy holds only the package: its dependencies come from the installed release.
    result = run(tmp_path / "x", "--configs", "defaults", "vector", "--dataset.chunks", "shared", timeout=120,
                 release=release, env={**ENV, "PYTHONPATH": str(RELEASE)})
    assert result.returncode == 2, result.stderr
    # TensorFlow's own start-up lines may come first; the error is one line and the last.
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "is not the 2.2.0 release" in last and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_command(tmp_path):
    logdir = tmp_path / "run"
    args = [*TINY, "--steps", "400", "--seed", "1"]
    process = subprocess.Popen(command(logdir, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                               cwd=ROOT)
    deadline = time.time() + 240
    while not (logdir / "variables.pkl").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert process.poll() is None, "the run ended before its first save"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (logdir / "finished.json").exists()
    episodes = len(list((logdir / "train_episodes").glob("*.npz")))

    result = run(logdir, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Load checkpoint" in result.stdout and "Prefill dataset" not in result.stdout
    assert len(list((logdir / "train_episodes").glob("*.npz"))) > episodes
    assert json.loads((logdir / "finished.json").read_text()) == {"steps": 400}
    assert max(line["step"] for line in lines(logdir)) >= 400


@pytest.mark.slow
def test_the_seed_fixes_the_random_prefill(tmp_path):
    def prefill_returns(name: str, seed: str) -> list[float]:
        result = run(tmp_path / name, *TINY, "--prefill", "200", "--steps", "200", "--seed", seed)  # no training
        assert result.returncode == 0, result.stderr[-3000:]
        return [line["train_return"] for line in lines(tmp_path / name) if "train_return" in line]

    first = prefill_returns("a", "5")
    assert len(first) > 4
    assert prefill_returns("b", "5") == first
    assert prefill_returns("c", "6") != first


# The release's RSSM with zero weights, after compare_release_run's seeding: every step's logits are uniform,
# so independent latents agree with the first step's only by chance (1/8 of the cells).
LATENT_DRAWS = """
import sys
import numpy as np
sys.path.insert(0, "scripts")
import release_side
_, common = release_side.load_release(sys.argv[1])
import compare_release_run
compare_release_run.seed_release(0)
import tensorflow as tf
rssm = common.EnsembleRSSM(ensemble=1, stoch=4, deter=8, hidden=8, discrete=8)
embed, action = tf.random.normal([3, 12, 5]), tf.one_hot(tf.zeros([3, 12], tf.int32), 2)
observe = tf.function(lambda: rssm.observe(embed, action, tf.zeros([3, 12], bool))[0])
observe()
for variable in rssm.variables:
    variable.assign(tf.zeros_like(variable))
post = observe()
assert np.all(post["logit"].numpy() == 0)
classes = tf.argmax(post["stoch"], -1).numpy()
print(np.mean(classes[:, 1:] == classes[:, :1]))
"""


def test_the_release_draws_each_steps_latents_afresh(tmp_path):
    # A global TensorFlow seed would give every step of the release's sequences the same random numbers.
    command(tmp_path)  # fails when the release is missing
    done = subprocess.run([sys.executable, "-c", LATENT_DRAWS, str(RELEASE)], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 0.4
