"""SIGTERM and SIGINT in every phase of a run: prefill, pretraining and evaluation stop at once, save a
checkpoint and exit 0, so that a scheduler's grace period is enough (an Atari eval episode can last 27,000
agent steps). Each phase is made far longer than the test waits, and the test checks it was cut short.

The runs train on a small env through the Python API in a subprocess. Its training episodes are cut at 20
steps by `train_time_limit`; evaluation episodes run 20,000 steps, far longer than the test waits. The env
writes a line to a file when an episode passes step 300, so the test knows an evaluation is under way.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": str(ROOT)}
SCRIPT = """
import sys
import gymnasium
import numpy as np
import dreamerv2_tf
from dreamerv2_tf import config as configlib

MARKER = sys.argv[2]

class Corridor(gymnasium.Env):
    observation_space = gymnasium.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gymnasium.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self.t += 1
        if self.t == 300:  # only evaluation episodes get this far
            with open(MARKER, "a") as f:
                f.write("long episode\\n")
        return np.full(3, np.sin(self.t), np.float32), 0.0, self.t >= 20000, False, {}

overrides = dict(arg.split("=", 1) for arg in sys.argv[3:])
config = {"logdir": sys.argv[1], "steps": 10**6, "train_time_limit": 20, "eval_eps": 1, "eval_every": 10**6,
          "log_every": 50, "checkpoint_every": 10**6}
config.update({key: int(value) for key, value in overrides.items()})
dreamerv2_tf.train(Corridor, configlib.build(["defaults", "vector", "debug"], config))
"""


def start(tmp_path: Path, **overrides: int) -> tuple[subprocess.Popen, Path, Path]:
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    marker, logdir = tmp_path / "marker.txt", tmp_path / "run"
    out = open(tmp_path / "out.txt", "w")
    process = subprocess.Popen([sys.executable, str(script), str(logdir), str(marker),
                                *(f"{key}={value}" for key, value in overrides.items())],
                               stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    return process, logdir, tmp_path / "out.txt"


def wait_until(condition, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            raise AssertionError(f"{what}: not reached (exit {process.poll()})")
        time.sleep(0.2)


def stop_and_check(process: subprocess.Popen, logdir: Path, output: Path, sig: int) -> tuple[str, int]:
    """Signal the run; it must save and exit 0 (the phase it was in would take far longer than the wait)."""
    process.send_signal(sig)
    try:
        code = process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    text = output.read_text()
    assert code == 0, text[-3000:]
    assert f"received {signal.Signals(sig).name}" in text
    stopped = int(re.search(r"stopped at step ([\d,]+)", text).group(1).replace(",", ""))
    assert (logdir / "checkpoints" / f"ckpt-{stopped}.index").exists(), text[-3000:]
    return text, stopped


def test_sigterm_during_evaluation_ends_the_episode_saves_and_exits(tmp_path):
    process, logdir, output = start(tmp_path, prefill=100)
    marker = tmp_path / "marker.txt"
    # The first long episode is the random-action evaluation after prefill; the second, the eval policy's.
    wait_until(lambda: marker.exists() and len(marker.read_text().splitlines()) >= 1, process, "random evaluation")
    wait_until(lambda: len(marker.read_text().splitlines()) >= 2, process, "policy evaluation")
    text, _ = stop_and_check(process, logdir, output, signal.SIGTERM)
    assert "pretraining for" in text
    # The eval policy's episode was cut, not played to its end: only the random-action one is stored, and no
    # episode passed step 300 after it.
    assert len(list((logdir / "eval_episodes").glob("*.npz"))) == 1
    assert len(marker.read_text().splitlines()) == 2


@pytest.mark.parametrize("phase, sig", [("prefill", signal.SIGINT), ("pretrain", signal.SIGTERM)])
def test_signal_during_prefill_or_pretraining_saves_and_exits(tmp_path, phase, sig):
    if phase == "prefill":
        process, logdir, output = start(tmp_path, prefill=10**6)
        wait_until(lambda: len(list((logdir / "train_episodes").glob("*.npz"))) >= 3, process, "prefill")
    else:
        process, logdir, output = start(tmp_path, prefill=100, pretrain=10**5, eval_eps=0)
        wait_until(lambda: "pretraining for" in output.read_text(), process, "pretraining")
        time.sleep(3)
    text, stopped = stop_and_check(process, logdir, output, sig)
    assert ("pretraining for" in text) == (phase == "pretrain")
    assert stopped < 10**5  # far from the end of a prefill of 10**6 steps
    if phase == "pretrain":  # the run stopped during its 1 + 10**5 updates, not after them
        import tensorflow as tf

        reader = tf.train.load_checkpoint(str(logdir / "checkpoints" / f"ckpt-{stopped}"))
        assert 1 <= reader.get_tensor("agent/step/.ATTRIBUTES/VARIABLE_VALUE") < 10**4


# The main thread never sees a signal that another thread's handler call leaves pending, unless it asks: here
# SIGINT reaches a thread that sits in a C read() without the GIL (as TensorFlow's threads do), and SA_RESTART
# keeps that thread in the kernel, so nothing wakes the main thread. CPython 3.11 on Linux then sets no flag
# for the main thread's eval loop, and the signal stays pending until the loop asks for it.
UNSEEN_SIGNAL = """
import ctypes, os, signal, sys, threading
import numpy as np
from gymnasium import spaces
from dreamerv2_tf.loop.driver import Driver
from dreamerv2_tf.loop.stop import Stop

class Env:
    obs_space = {"x": spaces.Box(-1, 1, (1,), np.float32), "reward": spaces.Box(-1, 1, (), np.float32),
                 "is_first": spaces.Box(0, 1, (), bool), "is_last": spaces.Box(0, 1, (), bool),
                 "is_terminal": spaces.Box(0, 1, (), bool)}
    act_space = {"action": spaces.Discrete(2)}

    def reset(self):
        self.t = 0
        return {"x": np.zeros(1, np.float32), "reward": np.float32(0), "is_first": True, "is_last": False,
                "is_terminal": False}

    def step(self, action):
        self.t += 1
        return {"x": np.zeros(1, np.float32), "reward": np.float32(0), "is_first": False,
                "is_last": self.t == 10, "is_terminal": False}

libc = ctypes.CDLL(None, use_errno=True)
read_end, _ = os.pipe()

def receiver():
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    libc.read(read_end, ctypes.create_string_buffer(1), 1)

with Stop() as stop:
    if sys.argv[1] == "driver":  # eval.py's case: KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.siginterrupt(signal.SIGINT, False)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # only the receiver takes SIGINT
    threading.Thread(target=receiver, daemon=True).start()
    driver = Driver([Env()])
    # Nothing in the loop may check for signals itself: no printing, no NumPy random draws.
    policy = lambda obs, state: ({"action": np.eye(2, dtype=np.float32)[:1]}, state)
    print("looping", flush=True)
    try:
        driver(policy, steps=10**9, until=lambda: stop.requested)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
    print(f"stopped after {driver.steps} steps, requested {stop.requested}", flush=True)
"""


@pytest.mark.parametrize("handler", ["driver", "stop"])
def test_a_signal_that_another_thread_receives_still_stops_the_loop(tmp_path, handler):
    script = tmp_path / "unseen.py"
    script.write_text(textwrap.dedent(UNSEEN_SIGNAL))
    process = subprocess.Popen([sys.executable, str(script), handler], stdout=subprocess.PIPE, text=True, env=ENV,
                               cwd=ROOT)
    assert process.stdout.readline().strip() == "looping"
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    try:
        out, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the loop went on for 120 s after SIGINT")
    assert process.returncode == 0
    if handler == "driver":
        assert "KeyboardInterrupt" in out
    else:  # the run's handler: the stop flag, and no exception
        assert "KeyboardInterrupt" not in out and "requested True" in out
