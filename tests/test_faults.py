"""Fault injection: what clusters do to runs, done for real on tiny CartPole runs of the `debug` config.

Two runs on one logdir, kill -9 in the middle of a checkpoint save and the resume after it (taking over
the dead run's lock), a second SIGTERM, truncated and overwritten checkpoint files, a disk that fills up
during training (a small tmpfs, or an injected ENOSPC where mounting is not allowed), a read-only logdir
and a logdir that is a file. Every outcome is checked: exit status, a single "error:" line without a
traceback, no finished episode lost, metrics.jsonl whole and increasing, the newest intact checkpoint
restored.

Each run that trains costs ~20 s (mostly TensorFlow start-up and tracing), so the runs are started by
two module fixtures, several at a time, and the tests read their results.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
# Checkpoints every 100 agent steps, three kept; a log line every 100 steps; no evaluation.
CARTPOLE = ["--configs", "defaults", "debug", "--task", "gym_CartPole-v1", "--prefill", "100", "--eval_eps", "0",
            "--log_every", "100", "--checkpoint_every", "100", "--checkpoint_keep", "3"]
TIMEOUT = 300
LEFTOVER = re.compile(r"\.saving|_temp$|^checkpoint\.tmp")


# ---- helpers ---------------------------------------------------------------------------------------------


def train_cmd(logdir: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPTS / "train.py"), *CARTPOLE, "--logdir", str(logdir), "--steps", str(steps),
            *extra]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Run:
    """A script in the background, its output in files (so it can be polled without pipe deadlocks)."""

    def __init__(self, cmd: list[str], workdir: Path, name: str, env: dict | None = None,
                 sigint_ignored: bool = False):
        """`sigint_ignored`: start it with SIGINT ignored, as a job started with `&` from a script is."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.out, self.err = workdir / f"{name}.out", workdir / f"{name}.err"
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=err, env=env or ENV, cwd=ROOT,
                                            preexec_fn=ignore)
        self.pid = self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> None:
        deadline = time.time() + timeout
        while text not in self.out.read_text():
            assert self.alive(), f"ended before printing {text!r}:\n{self.out.read_text()}\n{self.err.read_text()}"
            assert time.time() < deadline, f"no {text!r} after {timeout} s"
            time.sleep(0.05)

    def result(self, timeout: float = TIMEOUT) -> Result:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        return Result(self.process.returncode, self.out.read_text(), self.err.read_text())


def run(cmd: list[str], timeout: float = TIMEOUT, env: dict | None = None) -> Result:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or ENV, cwd=ROOT)
    return Result(done.returncode, done.stdout, done.stderr)


def _noise(line: str) -> bool:
    # TensorFlow/absl chatter that TF_CPP_MIN_LOG_LEVEL does not silence (with its continuation lines), and
    # Python warnings (with their source line); tracebacks are checked for separately.
    return bool(re.match(r"^(WARNING: All log messages before absl|[IWE]\d{4} |\s|\S+:\d+: \w*Warning: )", line))


def error_line(result: Result) -> str:
    """The one line a failed script prints: no traceback, nothing else on stderr but TF start-up noise."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not _noise(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def metrics_steps(logdir: Path) -> list[int]:
    """Steps of metrics.jsonl; every line must be a complete JSON object."""
    lines = (logdir / "metrics.jsonl").read_text().splitlines()
    assert lines and all(line.strip() for line in lines)
    return [json.loads(line)["step"] for line in lines]


def episodes(logdir: Path) -> set[str]:
    return {path.name for path in (logdir / "train_episodes").glob("*.npz")}


def checkpoints(logdir: Path) -> list[int]:
    """Agent steps of the complete checkpoints (an .index file) in the logdir, ascending."""
    directory = logdir / "checkpoints"
    names = [path.name for path in directory.iterdir()] if directory.is_dir() else []
    found = (re.fullmatch(r"ckpt-(\d+)\.index", name) for name in names)
    return sorted(int(match.group(1)) for match in found if match)


def leftovers(logdir: Path) -> list[str]:
    return sorted(path.name for path in (logdir / "checkpoints").iterdir() if LEFTOVER.search(path.name))


def agent_values(prefix: Path) -> dict[str, np.ndarray]:
    """Every tensor under agent/ of a checkpoint, read with TensorFlow's own reader (checksums included)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map() if name.startswith("agent/")}


def lock_record(logdir: Path) -> dict:
    text = (logdir / "run.lock").read_text() if (logdir / "run.lock").exists() else ""
    return json.loads(text) if text.strip() else {}


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None and not os.environ.get("DREAMERV2_TEST_NO_MOUNT")


@contextlib.contextmanager
def mounted(*args: str) -> Iterator[bool]:
    """`mount args...` for the duration (the last argument is the mount point); False when not allowed."""
    ok = can_mount() and subprocess.run(["mount", *args], capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", args[-1]], capture_output=True)


def fill_up(directory: Path) -> None:
    """Write a file until the file system is full (the way another job fills a shared disk)."""
    with open(directory / "filler", "wb", buffering=0) as file:
        for size in (2**20, 4096, 64, 1):  # down to the last byte
            with contextlib.suppress(OSError):
                while True:
                    file.write(b"\0" * size)


# Faults injected into a script where no tmpfs or read-only mount is allowed (set
# DREAMERV2_TEST_NO_MOUNT=1 to use them anyway). ENOSPC: once FAULT_FLAG exists, every os.write to a
# file under FAULT_DIR writes half its bytes and then fails like a full disk. EROFS: opening for
# writing or creating anything under FAULT_RO_DIR fails like a read-only mount.
SITECUSTOMIZE = textwrap.dedent("""
    import errno, os
    _flag, _dir = os.environ.get("FAULT_FLAG"), os.environ.get("FAULT_DIR", "/nonexistent")
    if _flag:
        _write = os.write
        def _full_disk_write(fd, data):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if target.startswith(_dir) and os.path.exists(_flag):
                _write(fd, bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return _write(fd, data)
        os.write = _full_disk_write
    _ro = os.environ.get("FAULT_RO_DIR")
    if _ro:
        _open, _mkdir = os.open, os.mkdir
        def _read_only(path):
            return os.path.abspath(os.fspath(path)).startswith(_ro)
        def _ro_open(path, flags, *args, **kwargs):
            if _read_only(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return _open(path, flags, *args, **kwargs)
        def _ro_mkdir(path, *args, **kwargs):
            if _read_only(path) and not os.path.exists(path):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return _mkdir(path, *args, **kwargs)
        os.open, os.mkdir = _ro_open, _ro_mkdir
""")


def injecting(base: Path, **variables: str) -> dict:
    """ENV for a script with the faults of SITECUSTOMIZE switched on by `variables`."""
    site = base / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**ENV, "PYTHONPATH": f"{site}{os.pathsep}{ENV.get('PYTHONPATH', '')}", **variables}


# ---- the runs --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """kill -9 during a save with a second run refused meanwhile, the resume, a full disk, a second SIGTERM.

    Run A is killed while it writes its second (or a later) checkpoint, found by polling for the
    temporary files; run B starts on A's logdir while A lives. Run C resumes A's logdir, which lies on
    a small tmpfs (or gets an injected ENOSPC where mounting is not allowed): after C's second save
    another "job" fills the disk. Run S, in parallel with C, gets SIGTERM twice.
    """
    base = tmp_path_factory.mktemp("faults")
    out: dict = {"base": base}
    disk = base / "disk"
    disk.mkdir()
    stack = contextlib.ExitStack()
    out["tmpfs"] = stack.enter_context(mounted("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)))
    logdir = out["logdir"] = disk / "run"
    ckdir = logdir / "checkpoints"
    env = ENV if out["tmpfs"] else injecting(base, FAULT_FLAG=str(base / "disk_is_full"), FAULT_DIR=str(logdir))

    # A, B: kill -9 during a checkpoint save; a second run while A lives.
    a = Run(train_cmd(logdir, 2000), base, "A")
    out["a_pid"] = a.pid
    deadline = time.time() + TIMEOUT
    while lock_record(logdir).get("pid") != a.pid:
        assert a.alive() and time.time() < deadline, a.err.read_text()
        time.sleep(0.05)
    out["B"] = run(train_cmd(logdir, 2000))
    out["a_alive_after_B"] = a.alive()
    seen = None
    while seen is None:
        assert a.alive(), f"A ended before a save could be caught:\n{a.err.read_text()}"
        assert time.time() < deadline, "no checkpoint save of A caught"
        names = os.listdir(ckdir) if ckdir.is_dir() else []
        complete = [name for name in names if name.endswith(".index") and ".saving" not in name]
        saving = [name for name in names if ".saving" in name]
        if saving and complete:  # a save in progress, with an earlier complete checkpoint on disk
            os.kill(a.pid, signal.SIGKILL)
            seen = saving
        time.sleep(0.001)
    out["A"] = a.result()
    out["saving_seen"] = seen
    out["after_kill"] = {"checkpoints": checkpoints(logdir), "episodes": episodes(logdir),
                         "leftovers": leftovers(logdir), "lock": lock_record(logdir)}

    # C: resume after the kill until the disk fills up; S: a second SIGTERM while the first update is traced.
    out["resume_at"] = resume_at = max(out["after_kill"]["checkpoints"][-1], *metrics_steps(logdir))
    c = Run(train_cmd(logdir, resume_at + 2000), base, "C", env)
    s_logdir = out["s_logdir"] = base / "signalled"
    s = Run(train_cmd(s_logdir, 2000), base, "S")
    filled = {}

    def fill_disk() -> None:  # after C's second save: C fails in the middle of training
        while not (ckdir / f"ckpt-{resume_at + 200}.index").exists():
            if not c.alive():
                return
            time.sleep(0.01)
        filled["episodes"] = episodes(logdir)
        if out["tmpfs"]:
            fill_up(disk)
        else:
            Path(env["FAULT_FLAG"]).touch()
        filled["done"] = True

    filler = threading.Thread(target=fill_disk, daemon=True)
    filler.start()
    s.wait_for("pretraining for")
    s.process.send_signal(signal.SIGTERM)
    s.wait_for("received SIGTERM")
    s.process.send_signal(signal.SIGTERM)
    out["S"] = s.result()
    out["C"] = c.result()
    filler.join()
    out["filled"] = filled
    (disk / "filler").unlink(missing_ok=True)
    out["after_c"] = {"checkpoints": checkpoints(logdir), "episodes": episodes(logdir),
                      "metrics": metrics_steps(logdir), "leftovers": leftovers(logdir), "lock": lock_record(logdir),
                      "temp_episodes": sorted(p.name for p in (logdir / "train_episodes").iterdir()
                                              if p.suffix != ".npz")}
    for number in out["after_c"]["checkpoints"]:
        agent_values(ckdir / f"ckpt-{number}")  # each reads back completely
    # What the damaged-checkpoint tests start from, off the tmpfs.
    out["copy"] = base / "after_disk_full"
    shutil.copytree(logdir, out["copy"])
    stack.close()
    return out


def test_second_run_on_a_logdir_in_use_is_refused_with_one_line(runs):
    assert runs["a_alive_after_B"]  # B really ran while A held the logdir
    assert runs["B"].returncode == 2
    line = error_line(runs["B"])
    assert f"pid {runs['a_pid']}" in line and f"host {socket.gethostname()}" in line and "in use" in line


def test_kill_during_a_checkpoint_save_then_resume(runs):
    assert runs["A"].returncode == -signal.SIGKILL
    assert runs["saving_seen"]  # A was killed while it wrote a checkpoint
    after = runs["after_kill"]
    assert after["lock"]["pid"] == runs["a_pid"]  # the dead run's record stays behind: a stale lock
    expected = after["checkpoints"][-1]  # the newest complete checkpoint, never a half-written one
    c = runs["C"]
    # C takes the dead run's lock over with a warning naming it, and resumes from that checkpoint.
    assert "taking over the stale lock" in c.stderr and f"pid {runs['a_pid']}" in c.stderr
    assert f"resumed from {runs['logdir'] / 'checkpoints' / f'ckpt-{expected}'}\n" in c.stdout
    assert "prefill:" not in c.stdout and "pretraining" not in c.stdout  # the data and updates are kept
    continued = int(re.search(r"continuing at agent step ([\d,]+)", c.stdout).group(1).replace(",", ""))
    assert continued >= runs["resume_at"] >= expected  # never behind a logged step or the checkpoint
    assert after["episodes"] <= runs["after_c"]["episodes"]  # no finished episode lost
    steps = runs["after_c"]["metrics"]  # every line whole, across the kill
    assert steps == sorted(set(steps)) and steps[-1] >= runs["resume_at"] + 200
    # C's saves cleaned up what the kill left (and what its own failed save left).
    assert runs["after_c"]["leftovers"] == []


def test_disk_full_during_training_stops_cleanly_and_damages_nothing(runs):
    c, after = runs["C"], runs["after_c"]
    assert runs["filled"].get("done"), c.stdout
    assert c.returncode == 1, c.stderr
    line = error_line(c)
    assert line.startswith("error: disk full: No space left on device (") and str(runs["logdir"]) in line
    assert "saving a checkpoint failed too" in line or "saved a checkpoint before stopping" in line
    # What was on disk is still whole: metrics lines (checked above), checkpoints (each read back in
    # full), episodes (none lost, no temporary file left).
    assert len(after["checkpoints"]) == 3 and runs["resume_at"] + 200 in after["checkpoints"]
    assert runs["filled"]["episodes"] <= after["episodes"] and after["temp_episodes"] == []
    assert after["lock"] == {}


def test_second_sigterm_aborts_without_saving(runs):
    s = runs["S"]
    assert s.returncode == 128 + signal.SIGTERM
    assert error_line(s) == "error: received SIGTERM again: aborted without saving"
    assert checkpoints(runs["s_logdir"]) == [] and lock_record(runs["s_logdir"]) == {}


# ---- damaged checkpoints ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def damaged(runs):
    """Copies of C's logdir with its two newest checkpoints damaged, resumed (D) and evaluated (eval), and
    one with every checkpoint damaged (eval_none).

    The `checkpoint` index is deleted and a temporary one left as a kill during the very first save
    leaves it; leftover folders and orphaned checkpoints are added for the next save to clean up.
    """
    source = runs["copy"]
    steps = checkpoints(source)
    assert len(steps) == 3
    out = {"steps": steps, "intact_values": agent_values(source / "checkpoints" / f"ckpt-{steps[0]}")}
    base = runs["base"]
    runs_started = {}
    for name in ("D", "eval"):
        logdir = base / f"damaged_{name}"
        shutil.copytree(source, logdir)
        ckdir = logdir / "checkpoints"
        with open(ckdir / f"ckpt-{steps[2]}.data-00000-of-00001", "r+b") as file:
            file.truncate(1000)
        (ckdir / f"ckpt-{steps[1]}.index").write_bytes(np.random.default_rng(0).bytes(2000))
        (ckdir / "checkpoint").unlink()
        (ckdir / "checkpoint.tmp5f3a9c").write_text('model_checkpoint_path: "ckpt-')
        (ckdir / "ckpt-99.saving_temp").mkdir()
        (ckdir / "ckpt-99.saving_temp" / "part-00000-of-00001.index").write_bytes(b"x")
        for orphan in (1, 2, 3):  # complete checkpoints no index names any more
            for suffix in (".index", ".data-00000-of-00001"):
                shutil.copy(ckdir / f"ckpt-{steps[0]}{suffix}", ckdir / f"ckpt-{orphan}{suffix}")
        out[f"{name}_logdir"] = logdir
    none = out["eval_none_logdir"] = base / "damaged_all"  # every checkpoint damaged
    shutil.copytree(out["eval_logdir"], none)
    for index in (none / "checkpoints").glob("*.index"):
        index.write_bytes(b"\0" * 100)
    # D resumes up to the step C reached, so it restores and saves without training.
    last = metrics_steps(source)[-1]
    runs_started["D"] = Run(train_cmd(out["D_logdir"], last), base, "D")
    runs_started["eval"] = Run([sys.executable, str(SCRIPTS / "eval.py"), "--logdir", str(out["eval_logdir"]),
                                "--episodes", "1"], base, "eval")
    runs_started["eval_none"] = Run([sys.executable, str(SCRIPTS / "eval.py"), "--logdir", str(none),
                                     "--episodes", "1"], base, "eval_none")
    for name, process in runs_started.items():
        out[name] = process.result()
    return out


def test_resume_skips_damaged_checkpoints_and_restores_the_newest_intact_one(damaged):
    d, steps, logdir = damaged["D"], damaged["steps"], damaged["D_logdir"]
    assert d.returncode == 0, d.stderr
    assert "Traceback" not in d.stderr
    assert re.search(rf"skipped damaged checkpoints ckpt-{steps[2]} \(data file truncated\), "
                     rf"ckpt-{steps[1]} \(index file corrupt or truncated\); resuming from ckpt-{steps[0]}", d.stderr)
    assert f"resumed from {logdir / 'checkpoints' / f'ckpt-{steps[0]}'}\n" in d.stdout
    step = int(re.search(r"continuing at agent step ([\d,]+)", d.stdout).group(1).replace(",", ""))
    assert step > steps[0]  # from metrics.jsonl and the episodes: the step C reached
    # Its save cleaned up: leftovers, the damaged files and the orphans beyond checkpoint_keep are gone.
    assert leftovers(logdir) == []
    assert checkpoints(logdir) == sorted({3, steps[0], step})
    assert sorted(p.name for p in (logdir / "checkpoints").iterdir() if p.name.startswith(f"ckpt-{steps[1]}")) == []
    # The checkpoint it saved holds the weights of the one it restored: the newest intact one.
    saved = agent_values(logdir / "checkpoints" / f"ckpt-{step}")
    intact = damaged["intact_values"]
    assert saved.keys() == intact.keys() and all(np.array_equal(saved[k], intact[k]) for k in intact)
    import tensorflow as tf

    assert tf.train.latest_checkpoint(str(logdir / "checkpoints")).endswith(f"ckpt-{step}")


def test_eval_falls_back_to_the_newest_intact_checkpoint(damaged):
    result, steps = damaged["eval"], damaged["steps"]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and f"skipped damaged checkpoints ckpt-{steps[2]}" in result.stderr
    saved = json.loads((damaged["eval_logdir"] / "eval_results.json").read_text())
    assert saved["checkpoint"].endswith(f"ckpt-{steps[0]}") and len(saved["returns"]) == 1


def test_eval_with_only_damaged_checkpoints_gives_one_line(damaged):
    result, logdir = damaged["eval_none"], damaged["eval_none_logdir"]
    assert result.returncode == 2
    line = error_line(result)
    assert f"no checkpoint in {logdir / 'checkpoints'} can be read" in line and "index file corrupt" in line


def test_eval_out_that_cannot_be_written_is_refused_before_playing(runs, tmp_path):
    for out, cause in ((tmp_path / "missing" / "results.json", "does not exist"), (tmp_path, "is a directory")):
        result = run([sys.executable, str(SCRIPTS / "eval.py"), "--logdir", str(runs["copy"]), "--episodes", "50",
                      "--out", str(out)])
        assert result.returncode == 2 and cause in error_line(result) and str(out) in error_line(result)
        assert "episode 1" not in result.stdout  # refused before playing any episode


# ---- start-up refusals (no TensorFlow: a second each) ------------------------------------------------------


def test_logdir_that_is_a_file_or_under_one_is_refused(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    for logdir, text in ((file, f"--logdir {file} is a file"), (file / "run" / "seed0", f"lies under {file}")):
        result = run(train_cmd(logdir, 300))
        assert result.returncode == 2 and text in error_line(result)
    assert file.read_text() == "keep me"


def test_misspelt_task_writes_nothing_to_the_logdir(tmp_path):
    fresh, existing = tmp_path / "new" / "run", tmp_path / "existing"
    existing.mkdir()
    for logdir in (fresh, existing):
        result = run(train_cmd(logdir, 300, "--task", "gym_CartPoel-v1"))
        assert result.returncode == 2 and "unknown gymnasium env 'CartPoel-v1'" in error_line(result)
    assert not (tmp_path / "new").exists()  # not even the directories it would have created
    assert [p.name for p in existing.iterdir()] == ["run.lock"] and lock_record(existing) == {}


def test_read_only_logdir_gives_one_line(runs, tmp_path):
    # A read-only bind mount of a run's logdir (chmod would not stop root), else an injected EROFS.
    view = tmp_path / "readonly"
    view.mkdir()
    with mounted("--bind", "-o", "ro", str(runs["copy"]), str(view)) as ok:
        if not ok:
            shutil.copytree(runs["copy"], view, dirs_exist_ok=True)
        env = ENV if ok else injecting(tmp_path, FAULT_RO_DIR=str(view))
        cause = "Read-only file system"
        result = run(train_cmd(view, 5000), env=env)
        assert result.returncode == 2 and error_line(result) == f"error: cannot write to logdir {view}: {cause}"
        result = run(train_cmd(view / "new", 5000), env=env)
        assert result.returncode == 2 and error_line(result) == f"error: cannot create logdir {view / 'new'}: {cause}"
        result = run([sys.executable, str(SCRIPTS / "eval.py"), "--logdir", str(view), "--episodes", "1"], env=env)
        assert result.returncode == 2 and cause in error_line(result) and "eval_results.json" in error_line(result)


def test_logdir_locked_by_a_live_process_is_refused_then_taken_over_after_kill(tmp_path):
    holder = Run([sys.executable, "-c", "import sys, time; from dreamerv2_tf.loop.runlock import RunLock; "
                  "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)", str(tmp_path)],
                 tmp_path / "out", "holder")
    holder.wait_for("held", 60)
    result = run(train_cmd(tmp_path, 300))
    assert result.returncode == 2
    assert f"is in use by pid {holder.pid} on host {socket.gethostname()}" in error_line(result)
    assert not (tmp_path / "config.yaml").exists()
    holder.process.kill()
    holder.result()
    from dreamerv2_tf.loop.runlock import RunLock

    with pytest.warns(RuntimeWarning, match=f"taking over the stale lock .* of pid {holder.pid} on host"):
        with RunLock(tmp_path):
            assert lock_record(tmp_path)["pid"] == os.getpid()


def test_scores_and_plot_on_binary_files_give_one_line(runs, tmp_path):
    binary = np.random.default_rng(1).bytes(3000)
    (tmp_path / "scores.csv").write_bytes(b"\xff" + binary)
    run_dir = tmp_path / "runs" / "pong"
    shutil.copytree(runs["copy"], run_dir, ignore=shutil.ignore_patterns("checkpoints", "*_episodes", "events*"))
    (run_dir / "metrics.jsonl").write_bytes(b"\xff" + binary)
    for cmd, path in (([str(SCRIPTS / "scores.py"), str(tmp_path / "scores.csv")], tmp_path / "scores.csv"),
                      ([str(SCRIPTS / "scores.py"), str(tmp_path / "runs")], run_dir / "metrics.jsonl"),
                      ([str(SCRIPTS / "plot.py"), str(tmp_path / "runs"), "--out", str(tmp_path / "p.png")],
                       run_dir / "metrics.jsonl")):
        result = run([sys.executable, *cmd])
        assert result.returncode == 2
        assert error_line(result) == f"error: {path} is not a text file (binary data at byte 0)"


# ---- in-process: the lock and the checkpointer on their own ------------------------------------------------


def test_stale_lock_of_a_dead_pid_is_taken_over_and_another_hosts_fresh_lock_refused(tmp_path):
    from dreamerv2_tf.loop.runlock import LOCK_FILE, LogdirInUse, RunLock

    lock_file = tmp_path / LOCK_FILE
    pid = dead_pid()
    lock_file.write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    with pytest.warns(RuntimeWarning, match=f"stale lock .* of pid {pid} on host {socket.gethostname()}"):
        with RunLock(tmp_path):
            pass
    assert lock_file.read_text() == ""  # released: a free lock, no warning next time
    # Another host: its lock refreshed a moment ago is refused, one not refreshed for long is taken over.
    lock_file.write_text(json.dumps({"pid": 4242, "host": "node-elsewhere"}))
    with pytest.raises(LogdirInUse, match="in use by pid 4242 on host node-elsewhere"):
        RunLock(tmp_path).acquire()
    os.utime(lock_file, (time.time() - 3600, time.time() - 3600))
    with pytest.warns(RuntimeWarning, match="taking over the lock .* of pid 4242 on host node-elsewhere"):
        with RunLock(tmp_path):
            # A second holder in this very process is refused too (flock is per open file).
            with pytest.raises(LogdirInUse, match=f"pid {os.getpid()}"):
                RunLock(tmp_path).acquire()


def test_second_signal_raises_aborted_with_the_shell_exit_status():
    from dreamerv2_tf.loop.stop import Aborted, Stop

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Aborted) as error:
        with Stop() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            assert stop.requested
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert error.value.exit_status == 130 and str(error.value) == "received SIGINT again: aborted without saving"
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def _module(value: float, size: int = 1000):
    import tensorflow as tf

    module = tf.Module()
    module.v = tf.Variable(tf.fill([size], value))
    return module


def _saved(directory: Path, steps=(100, 200, 300), size: int = 1000):
    from dreamerv2_tf.loop.checkpoint import Checkpointer

    for step in steps:
        Checkpointer(directory, 3, m=_module(float(step), size)).save(step)


DAMAGE = {
    "truncated data": (lambda p: open(f"{p}.data-00000-of-00001", "r+b").truncate(100), "data file truncated"),
    "random data": (lambda p: Path(f"{p}.data-00000-of-00001").write_bytes(os.urandom(4000)), "checksum"),
    "truncated index": (lambda p: open(f"{p}.index", "r+b").truncate(30), "index file corrupt"),
    "random index": (lambda p: Path(f"{p}.index").write_bytes(os.urandom(300)), "index file corrupt"),
    "deleted data": (lambda p: os.remove(f"{p}.data-00000-of-00001"), "data file missing"),
    "deleted index": (lambda p: os.remove(f"{p}.index"), ".index file is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_restore_falls_back_over_a_damaged_newest_checkpoint(tmp_path, damage):
    from dreamerv2_tf.loop.checkpoint import Checkpointer

    _saved(tmp_path)
    harm, reason = DAMAGE[damage]
    harm(tmp_path / "ckpt-300")
    module = _module(0.0)
    with pytest.warns(RuntimeWarning, match=f"skipped damaged checkpoint ckpt-300 \\(.*{reason}"):
        restored = Checkpointer(tmp_path, 3, m=module).restore()
    assert restored == str(tmp_path / "ckpt-200") and float(module.v[0]) == 200.0


def test_a_complete_checkpoint_counts_without_the_index_file(tmp_path):
    # A kill during the very first save, after the checkpoint was written but before `checkpoint` was.
    from dreamerv2_tf.loop.checkpoint import Checkpointer

    _saved(tmp_path, steps=(500,))
    (tmp_path / "checkpoint").unlink()
    (tmp_path / "checkpoint.tmp8c1e0f").write_text("")
    module = _module(0.0)
    assert Checkpointer(tmp_path, 3, m=module).restore() == str(tmp_path / "ckpt-500")
    assert float(module.v[0]) == 500.0
    (tmp_path / "checkpoint").write_bytes(os.urandom(200))  # an index file of garbage does not matter either
    assert Checkpointer(tmp_path, 3, m=_module(0.0)).restore() == str(tmp_path / "ckpt-500")


def test_only_damaged_checkpoints_give_one_line_errors(tmp_path):
    import keras
    import tensorflow as tf

    from dreamerv2_tf.loop.checkpoint import Checkpointer, DamagedCheckpoint, restore_weights

    agent = tf.Module()
    agent.layer = keras.layers.Dense(3)
    agent.layer.build((None, 2))
    for step in (100, 200):
        Checkpointer(tmp_path, 3, agent=agent).save(step)
    for prefix in ("ckpt-100", "ckpt-200"):
        DAMAGE["random index"][0](tmp_path / prefix)
    with pytest.raises(DamagedCheckpoint) as error:
        Checkpointer(tmp_path, 3, agent=agent).restore()
    assert "\n" not in str(error.value) and "ckpt-200 (index file corrupt" in str(error.value)
    with pytest.raises(DamagedCheckpoint, match="no checkpoint in .* can be read"):
        restore_weights(tmp_path, agent)  # eval.py, openloop.py, --from_checkpoint DIR
    with pytest.raises(DamagedCheckpoint, match="checkpoint .*ckpt-100 cannot be read: index file corrupt"):
        restore_weights(tmp_path / "ckpt-100", agent)  # --from_checkpoint PREFIX


def test_save_on_a_full_disk_removes_its_partial_files_and_keeps_the_rest(tmp_path):
    # A tmpfs too small for a second checkpoint, else TensorFlow's own error injected mid-write.
    import tensorflow as tf

    from dreamerv2_tf.loop.checkpoint import Checkpointer

    disk = tmp_path / "disk"
    disk.mkdir()
    with mounted("-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)) as ok:
        checkpointer = Checkpointer(disk, 3, m=_module(1.0, 100_000))  # 400 kB each: the second does not fit
        checkpointer.save(100)
        if not ok:
            def write_half(prefix, **kwargs):
                Path(f"{prefix}_temp").mkdir()
                Path(f"{prefix}_temp", "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\0" * 1000)
                raise tf.errors.ResourceExhaustedError(None, None, f"{prefix}_temp/part; No space left on device")

            checkpointer._checkpoint.write = write_half
        with pytest.raises(OSError) as error:
            checkpointer.save(200)
        assert error.value.errno == errno.ENOSPC and error.value.filename == str(disk / "ckpt-200")
        assert sorted(p.name for p in disk.iterdir()) == ["checkpoint", "ckpt-100.data-00000-of-00001",
                                                          "ckpt-100.index"]
        module = _module(0.0, 100_000)
        assert Checkpointer(disk, 3, m=module).restore() == str(disk / "ckpt-100") and float(module.v[0]) == 1.0
