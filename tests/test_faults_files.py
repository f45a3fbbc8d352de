"""Damaged run files, done for real on a tiny CartPole run of the `debug` config: a config.yaml cut in the
middle (not YAML any more), emptied or deleted, and a metrics.jsonl line cut by a crash before a resume.

One module fixture trains the run (~20 s) and starts the resumes that need TensorFlow together; the
refusals that come before TensorFlow loads take a second each. Helpers come from test_faults.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from test_faults import SCRIPTS, Run, checkpoints, error_line, run, train_cmd

from dreamerv2_tf import config as configlib


def snapshot(logdir: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder of a logdir with its size and modification time, but the lock's record."""
    return {str(path.relative_to(logdir)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(logdir.rglob("*")) if path.name != "run.lock"}


def copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def cut_inside_a_list(path: Path) -> None:
    """Truncate a saved config.yaml just after the opening bracket of a flow list, as a crash (or a full disk)
    during a copy would: the rest of the file is gone and what is left is not YAML."""
    text = path.read_bytes()
    with open(path, "r+b") as file:
        file.truncate(text.index(b"[") + 3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 300-step run, then the resumes of copies of it: with config.yaml emptied (same command, more steps), with
    config.yaml deleted and a different architecture asked for, then that copy with the run's own command."""
    base = tmp_path_factory.mktemp("file_faults")
    source = base / "run"
    result = run(train_cmd(source, 300))
    assert result.returncode == 0, result.stderr
    out = {"base": base, "source": source, "checkpoints": checkpoints(source)}

    emptied = out["emptied"] = copy(source, base / "emptied")
    os.truncate(emptied / "config.yaml", 0)
    deleted = out["deleted"] = copy(source, base / "deleted")
    (deleted / "config.yaml").unlink()
    out["deleted_before"] = snapshot(deleted)
    resume = Run(train_cmd(emptied, 400), base, "emptied")
    refused = Run(train_cmd(deleted, 400, "--rssm.deter", "48"), base, "refused")
    out["refused"] = refused.result()
    out["deleted_after"] = snapshot(deleted)
    out["original"] = Run(train_cmd(deleted, 400), base, "original").result()
    out["emptied_result"] = resume.result()
    return out


def test_config_yaml_that_is_not_yaml_gives_one_line_in_every_script(trained, tmp_path):
    logdir = copy(trained["source"], tmp_path / "run")
    path = logdir / "config.yaml"
    cut_inside_a_list(path)
    damaged = path.read_bytes()
    before = snapshot(logdir)
    expected = re.compile(rf"error: {re.escape(str(path))} is not valid YAML: expected ',' or '\]', but got "
                          r"'<stream end>' \(line \d+, column \d+\)")
    for cmd in (train_cmd(logdir, 400), [str(SCRIPTS / "eval.py"), "--logdir", str(logdir), "--episodes", "1"],
                [str(SCRIPTS / "openloop.py"), "--logdir", str(logdir)]):
        result = run(cmd if cmd[0] == sys.executable else [sys.executable, *cmd])
        assert result.returncode == 2, result.stderr
        assert expected.fullmatch(error_line(result)), error_line(result)
    assert path.read_bytes() == damaged and snapshot(logdir) == before  # nothing rewritten


def test_empty_config_yaml_counts_as_missing_on_resume(trained):
    result, logdir = trained["emptied_result"], trained["emptied"]
    assert result.returncode == 0, result.stderr
    assert f"{logdir / 'config.yaml'} is empty; treating it as missing" in result.stderr
    assert "different architecture" not in result.stderr + result.stdout
    assert f"resumed from {logdir / 'checkpoints' / 'ckpt-300'}\n" in result.stdout
    rewritten = configlib.Config.load(trained["source"] / "config.yaml").update({"steps": 400, "logdir": str(logdir)})
    assert configlib.Config.load(logdir / "config.yaml").to_dict() == rewritten.to_dict()
    assert checkpoints(logdir)[-1] == 400


def test_empty_config_yaml_is_refused_by_eval_and_openloop(trained, tmp_path):
    logdir = copy(trained["source"], tmp_path / "run")
    os.truncate(logdir / "config.yaml", 0)
    for script in ("eval.py", "openloop.py"):
        result = run([sys.executable, str(SCRIPTS / script), "--logdir", str(logdir)])
        assert result.returncode == 2
        assert error_line(result) == (f"error: {logdir / 'config.yaml'} is empty; it must hold the run's config "
                                      "(train.py writes it)")


def test_deleted_config_and_another_architecture_is_refused_before_anything_is_written(trained):
    result, logdir = trained["refused"], trained["deleted"]
    assert result.returncode == 2, result.stderr
    line = error_line(result)  # also: no TensorFlow warnings about the restore it gave up
    assert line.startswith(f"error: cannot resume: the checkpoints in {logdir / 'checkpoints'} hold a different "
                           "agent than this config builds (")
    assert "incompatible tensor with shape" in line  # the variable whose shapes differ, and both shapes
    assert trained["deleted_after"] == trained["deleted_before"]  # no config.yaml, nothing else touched
    # So the run's own command still resumes it.
    original = trained["original"]
    assert original.returncode == 0, original.stderr
    assert f"resumed from {logdir / 'checkpoints' / 'ckpt-300'}\n" in original.stdout
    assert configlib.Config.load(logdir / "config.yaml").rssm.deter == 32
    assert checkpoints(logdir)[-1] == 400


def test_a_metrics_line_cut_by_a_crash_is_skipped_by_scores_and_plot(tmp_path):
    from dreamerv2_tf.loop.logger import METRICS_FILE, Logger

    logdir = tmp_path / "runs" / "atari_pong" / "seed0"
    logdir.mkdir(parents=True)
    configlib.build(["defaults", "atari"], {"task": "atari_pong"}).save(logdir / "config.yaml")

    def log(steps: list[int]) -> None:  # what a run writes: a logger per process, each line on its own
        current = {"step": steps[0]}
        logger = Logger(logdir, lambda: current["step"], action_repeat=4, tensorboard=False, terminal=False)
        for step in steps:
            current["step"] = step
            logger.add({"eval_return": step / 100 - 21.0, "model_loss": 1.0})
            logger.write()
        logger.close()

    log([100, 200, 300])
    path = logdir / METRICS_FILE
    size = path.stat().st_size
    os.truncate(path, size - 20)  # a kill in the middle of the last write
    log([400, 500])  # the resumed run
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and not lines[2].endswith("}")
    warning = f"warning: {path}: skipped 1 of 5 lines that are not complete JSON objects (line 3)"
    scores = run([sys.executable, str(SCRIPTS / "scores.py"), str(tmp_path / "runs"), "--allow-partial", "--json"])
    assert scores.returncode == 0, scores.stderr
    assert scores.stderr.splitlines() == [warning]
    game = json.loads(scores.stdout)["methods"]["dreamerv2_tf"]["games"]["atari_pong"]
    assert game["scores"] == {"0": -16.0}  # the last evaluation, written after the cut line
    plot = run([sys.executable, str(SCRIPTS / "plot.py"), str(tmp_path / "runs"), "--out", str(tmp_path / "p.png")])
    assert plot.returncode == 0, plot.stderr
    assert plot.stderr.splitlines() == [warning] and (tmp_path / "p.png").stat().st_size > 0
