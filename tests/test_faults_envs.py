"""Faults around the envs, done for real on tiny CartPole runs of the `debug` config: an env worker process
killed with -9, the trainer killed with -9 under its env workers, an env that raises mid-episode (from
scripts/train.py and from `dreamerv2_tf.train`), and Ctrl-C or SIGTERM in scripts/eval.py after some episodes.

The runs start together in one module fixture (each costs ~20 s of TensorFlow start-up and tracing);
the tests read their results. Helpers come from test_faults.py.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
from test_faults import ENV, SCRIPTS, TIMEOUT, Run, agent_values, checkpoints, error_line, lock_record, train_cmd

PROCESS_ENVS = ("--envs", "2", "--envs_parallel", "process")
FAIL_AT = 300  # the env step at which the failing envs raise: after prefill and pretraining, mid-episode

# A gymnasium env that a user registers in their own module and names as --task gym_<module>:<id>.
FAULTY_ENV_MODULE = textwrap.dedent("""
    import os

    import gymnasium
    from gymnasium.envs.classic_control.cartpole import CartPoleEnv


    class FailingCartPole(CartPoleEnv):
        steps = 0  # over all instances of the process

        def step(self, action):
            FailingCartPole.steps += 1
            if FailingCartPole.steps == int(os.environ["FAIL_AT_STEP"]):
                raise RuntimeError("the simulator lost its state")
            return super().step(action)


    gymnasium.register("FailingCartPole-v1", entry_point=FailingCartPole, max_episode_steps=500)
""")

# dreamerv2_tf.train with an env that raises its own exception type; prints what reached the caller.
API_SCRIPT = textwrap.dedent("""
    import json, sys, traceback

    import gymnasium

    import dreamerv2_tf
    from dreamerv2_tf import config as configlib


    class SimulatorError(RuntimeError):
        pass


    class FailsAtStep(gymnasium.Wrapper):
        count = 0

        def step(self, action):
            FailsAtStep.count += 1
            if FailsAtStep.count == int(sys.argv[2]):
                raise SimulatorError("the simulator lost its state")
            return super().step(action)


    config = configlib.build(["defaults", "debug"], {
        "logdir": sys.argv[1], "steps": 5000, "prefill": 100, "eval_eps": 0, "log_every": 100,
        "checkpoint_every": 100, "checkpoint_keep": 3})
    try:
        dreamerv2_tf.train(lambda: FailsAtStep(gymnasium.make("CartPole-v1")), config)
    except SimulatorError as exc:
        frames = [frame.name for frame in traceback.extract_tb(exc.__traceback__)]
        print(json.dumps({"notes": getattr(exc, "__notes__", []), "frames": frames}))
""")


def workers(process: psutil.Process) -> list[psutil.Process]:
    """The env worker processes of a trainer (spawned by multiprocessing)."""
    return [child for child in process.children() if "spawn_main" in " ".join(child.cmdline())]


def gone(processes: list[psutil.Process], timeout: float) -> bool:
    """Whether every process has ended (a zombie counts as ended: nothing reaps orphans in some containers)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes):
                return True
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    return False


def stopped(result, cause: str) -> re.Match:
    """The one line of a run that saved and stopped with status 1 because of `cause` (a regex)."""
    assert result.returncode == 1, result.stderr
    line = error_line(result)
    match = re.fullmatch(f"error: {cause}; saved a checkpoint before stopping", line)
    assert match, line
    return match


def wait_until(condition, run: Run, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert run.alive(), f"ended before {what}:\n{run.out.read_text()}\n{run.err.read_text()}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """W: one of two env worker processes killed with -9 during training, then eval.py on W's logdir
    interrupted with SIGINT (and once with SIGTERM) after some episodes. K: the trainer killed with -9
    under its env workers. E: scripts/train.py on a registered gymnasium env that raises mid-episode.
    P: the same through `dreamerv2_tf.train(env_fn)`."""
    base = tmp_path_factory.mktemp("env_faults")
    modules = base / "modules"
    modules.mkdir()
    (modules / "faultyenv.py").write_text(FAULTY_ENV_MODULE)
    failing = {**ENV, "FAIL_AT_STEP": str(FAIL_AT), "PYTHONPATH": f"{modules}:{ENV.get('PYTHONPATH', '')}"}
    logdirs = {name: base / name for name in ("W", "K", "E", "P")}
    out: dict = {"logdirs": logdirs}
    # No periodic checkpoint in W: the one it has is the save before stopping.
    w = Run(train_cmd(logdirs["W"], 10**5, *PROCESS_ENVS, "--checkpoint_every", str(10**6)), base, "W")
    k = Run(train_cmd(logdirs["K"], 10**5, *PROCESS_ENVS), base, "K")
    e = Run(train_cmd(logdirs["E"], 10**5, "--task", "gym_faultyenv:FailingCartPole-v1"), base, "E", failing)
    p = Run([sys.executable, "-c", API_SCRIPT, str(logdirs["P"]), str(FAIL_AT)], base, "P")

    wait_until(lambda: "pretraining for" in k.out.read_text(), k, "pretraining")
    children = psutil.Process(k.pid).children(recursive=True)  # env workers, multiprocessing's resource tracker
    out["K_commands"] = [" ".join(child.cmdline()) for child in children]
    k.process.send_signal(signal.SIGKILL)
    out["K"] = k.result()
    out["K_gone"] = gone(children, 30)

    # W: a worker dies once training runs (the first log line is written after 100 agent steps).
    wait_until(lambda: (logdirs["W"] / "metrics.jsonl").exists(), w, "a log line")
    trainer = psutil.Process(w.pid)
    children = trainer.children(recursive=True)
    victim = workers(trainer)[-1]
    out["W_victim"] = victim.pid
    victim.kill()
    out["W"] = w.result()
    out["W_gone"] = gone(children, 30)

    # eval.py on W's logdir, interrupted after three episodes. It starts with SIGINT ignored, as a job
    # started with `&` from a script inherits it; Python then raises no KeyboardInterrupt, so eval.py
    # must install its own handler (it played on for good without one).
    # A second one, stopped by SIGTERM (as a scheduler does), writes its results elsewhere.
    out["eval_out"] = logdirs["W"] / "eval_results.json"
    out["eval_term_out"] = base / "eval_term.json"
    evaluations = {
        "eval": Run([sys.executable, str(SCRIPTS / "eval.py"), "--logdir", str(logdirs["W"]), "--episodes",
                     str(10**6)], base, "eval", sigint_ignored=True),
        "eval_term": Run([sys.executable, str(SCRIPTS / "eval.py"), "--logdir", str(logdirs["W"]), "--episodes",
                          str(10**6), "--out", str(out["eval_term_out"])], base, "eval_term")}
    for evaluation, sig in zip(evaluations.values(), (signal.SIGINT, signal.SIGTERM), strict=True):
        evaluation.wait_for("episode 3:")
        evaluation.process.send_signal(sig)
    for name, evaluation in evaluations.items():
        out[name] = evaluation.result()
    out["E"], out["P"] = e.result(), p.result()
    return out


def test_a_dead_env_worker_saves_then_stops_with_one_line_naming_it(runs):
    logdir = runs["logdirs"]["W"]
    match = stopped(runs["W"], r"at agent step ([\d,]+), train env [01] failed: its worker process (\d+) died "
                               r"\(killed by SIGKILL\)")
    step = int(match.group(1).replace(",", ""))
    assert int(match.group(2)) == runs["W_victim"]
    # The save came from the failure (periodic saves were off), at the step reached; the agent reads back.
    assert checkpoints(logdir) == [step] and step >= 100
    values = agent_values(logdir / "checkpoints" / f"ckpt-{step}")
    assert values and all(np.isfinite(value).all() for value in values.values() if value.dtype.kind == "f")
    assert lock_record(logdir) == {}
    assert runs["W_gone"]  # the other worker and the resource tracker ended with the run


def test_env_workers_and_resource_tracker_exit_when_the_trainer_is_killed(runs):
    assert runs["K"].returncode == -signal.SIGKILL
    commands = runs["K_commands"]
    assert sum("spawn_main" in command for command in commands) == 2  # both env workers
    assert sum("resource_tracker" in command for command in commands) == 1
    assert runs["K_gone"]


def test_an_env_raising_mid_episode_saves_and_gives_one_line_from_the_script(runs):
    logdir = runs["logdirs"]["E"]
    match = stopped(runs["E"], r"at agent step ([\d,]+), train env 0 raised RuntimeError: the simulator lost its state")
    step = int(match.group(1).replace(",", ""))
    assert FAIL_AT - 20 <= step < FAIL_AT  # resets are no agent steps; the failing step is not counted
    assert checkpoints(logdir)[-1] == step and lock_record(logdir) == {}
    agent_values(logdir / "checkpoints" / f"ckpt-{step}")  # reads back completely


def test_an_env_raising_in_the_python_api_saves_then_reraises_its_own_exception(runs):
    result, logdir = runs["P"], runs["logdirs"]["P"]
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "step" in report["frames"]  # the traceback reaches into the env's own step()
    [note] = report["notes"]
    match = re.fullmatch(r"dreamerv2_tf: at agent step ([\d,]+), train env 0 raised SimulatorError: the simulator "
                         r"lost its state; saved a checkpoint before stopping", note)
    assert match, note
    step = int(match.group(1).replace(",", ""))
    assert checkpoints(logdir)[-1] == step and lock_record(logdir) == {}


@pytest.mark.parametrize("name, sig", [("eval", signal.SIGINT), ("eval_term", signal.SIGTERM)])
def test_ctrl_c_or_sigterm_in_eval_writes_and_prints_the_finished_episodes(runs, name, sig):
    result, path = runs[name], runs[f"{name}_out"]
    assert result.returncode == 128 + sig, result.stderr
    saved = json.loads(path.read_text())
    count = saved["episodes"]
    assert count >= 3 and len(saved["returns"]) == len(saved["lengths"]) == count
    assert saved["interrupted"] is True and saved["requested"] == 10**6 and saved["signal"] == sig.name
    assert saved["mean"] == pytest.approx(np.mean(saved["returns"]))
    assert error_line(result) == (f"error: interrupted ({sig.name}) after {count} of {10**6} episodes; their results "
                                  f"are above and in {path}")
    assert f"return mean {saved['mean']:.2f}" in result.stdout and f"over {count} episodes" in result.stdout
