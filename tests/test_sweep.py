"""Command generation of the 55-game sweep (scripts/sweep.py); --launch only with a stand-in trainer."""

import importlib.util
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dreamerv2_tf.tools.scores import GAMES

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "sweep.py"

spec = importlib.util.spec_from_file_location("sweep_script", SCRIPT)
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd)


def test_default_sweep_is_55_games_by_5_seeds_seed_major():
    result = run()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 55 * 5
    assert lines[0] == ("python scripts/train.py --configs defaults atari --task atari_alien --seed 0 "
                        "--logdir logdir/atari_alien/seed0")
    assert lines[-1].endswith("--task atari_zaxxon --seed 4 --logdir logdir/atari_zaxxon/seed4")
    tasks = [shlex.split(line)[shlex.split(line).index("--task") + 1] for line in lines[:55]]
    assert tasks == list(GAMES)
    assert len(set(lines)) == len(lines)


def test_subset_seeds_configs_root_and_extra_flags():
    result = run("--games", "pong", "JamesBond", "atari_breakout", "pong", "--seeds", "2", "7",
                 "--configs", "defaults", "atari_paper", "--root", "/data/runs/", "--python", "python3.11",
                 "--", "--steps", "1e6", "--rssm.deter", "200")
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(commands) == 6
    first = commands[0]
    assert first == ["python3.11", "scripts/train.py", "--configs", "defaults", "atari_paper", "--task",
                     "atari_breakout", "--seed", "2", "--logdir", "/data/runs/atari_breakout/seed2",
                     "--steps", "1e6", "--rssm.deter", "200"]
    assert [(c[c.index("--task") + 1], c[c.index("--seed") + 1]) for c in commands] == [
        ("atari_breakout", "2"), ("atari_james_bond", "2"), ("atari_pong", "2"),
        ("atari_breakout", "7"), ("atari_james_bond", "7"), ("atari_pong", "7"),
    ]


def test_paths_with_spaces_are_quoted(tmp_path):
    result = run("--games", "pong", "--seeds", "0", "--root", "my runs")
    assert shlex.split(result.stdout)[-1] == "my runs/atari_pong/seed0"


def test_slurm_array_script_indexes_the_command_list(tmp_path):
    out = tmp_path / "sweep.sbatch"
    result = run("--format", "slurm", "--out", str(out), "--games", "pong", "breakout", "--seeds", "0", "1",
                 "--root", "runs", "--workdir", str(tmp_path), "--partition", "gpu", "--max-parallel", "3",
                 "--time", "2-00:00:00", "--", "--steps", "1e5")
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert text.startswith("#!/bin/bash\n")
    assert "#SBATCH --array=0-3%3" in text
    assert "#SBATCH --gres=gpu:1" in text and "#SBATCH --partition=gpu" in text
    assert "#SBATCH --time=2-00:00:00" in text
    assert f"#SBATCH --output={tmp_path}/runs/slurm/%A_%a.out" in text
    assert (tmp_path / "runs" / "slurm").is_dir()  # SLURM does not create the --output directory itself
    assert "${COMMANDS[$SLURM_ARRAY_TASK_ID]}" in text
    # The array holds the same commands as the list format, in the same order.
    listed = run("--games", "pong", "breakout", "--seeds", "0", "1", "--root", "runs", "--", "--steps", "1e5")
    array = re.search(r"COMMANDS=\(\n(.*?)\n\)", text, re.S).group(1).splitlines()
    assert [shlex.split(item)[0] for item in array] == listed.stdout.splitlines()


def test_slurm_script_selects_the_right_command_in_bash(tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "ran: $*"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "my runs").mkdir()
    out = tmp_path / "job.sh"
    result = run("--format", "slurm", "--out", str(out), "--games", "pong", "breakout", "--seeds", "0",
                 "--root", "my runs", "--python", str(fake), "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1"}
    ran = subprocess.run(["bash", str(out)], capture_output=True, text=True, env=env)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines()[-1] == ("ran: scripts/train.py --configs defaults atari --task atari_pong "
                                           "--seed 0 --logdir my runs/atari_pong/seed0")
    unset = {key: value for key, value in os.environ.items() if key != "SLURM_ARRAY_TASK_ID"}
    assert subprocess.run(["bash", str(out)], capture_output=True, env=unset).returncode != 0


def test_launch_runs_every_command_with_a_stand_in_trainer(tmp_path):
    # A fake interpreter records its arguments instead of training.
    fake = tmp_path / "fakepython"
    fake.write_text('#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES $*" >> "$SWEEP_RECORD"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "record.txt"
    env = {**os.environ, "SWEEP_RECORD": str(record)}
    result = subprocess.run([sys.executable, str(SCRIPT), "--launch", "--workers", "2", "--devices", "5",
                             "--games", "pong", "breakout", "--seeds", "0", "1", "--root", str(tmp_path / "r"),
                             "--python", str(fake)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "4 of 4 runs succeeded" in result.stdout
    lines = record.read_text().splitlines()
    assert len(lines) == 4 and all(line.startswith("5 scripts/train.py") for line in lines)
    assert (tmp_path / "r" / "sweep_logs").is_dir()


def launch_recorded(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """--launch with a fake interpreter that records its CUDA_VISIBLE_DEVICES and arguments."""
    tmp_path.mkdir(exist_ok=True)
    fake = tmp_path / "fakepython"
    fake.write_text('#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES $*" >> "$SWEEP_RECORD"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "record.txt"
    result = subprocess.run([sys.executable, str(SCRIPT), "--launch", "--games", "pong", "breakout", "alien",
                             "boxing", "--seeds", "0", "1", "--root", str(tmp_path / "r"), "--python", str(fake),
                             *args], capture_output=True, text=True, env={**os.environ, "SWEEP_RECORD": str(record)})
    assert result.returncode == 0, result.stderr
    return result, [line.split() for line in record.read_text().splitlines()]


def test_runs_sharing_a_gpu_start_with_memory_growth(tmp_path):
    result, runs = launch_recorded(tmp_path, "--workers", "8", "--devices", "0,1,2,3")
    assert "8 workers share 4 GPUs: every run starts with --gpu_memory growth" in result.stdout
    assert len(runs) == 8 and all(run[-2:] == ["--gpu_memory", "growth"] for run in runs)
    assert sorted(run[0] for run in runs) == ["0", "0", "1", "1", "2", "2", "3", "3"]  # two runs per GPU


def test_runs_with_a_gpu_each_keep_the_default_and_a_given_setting_wins(tmp_path):
    result, runs = launch_recorded(tmp_path, "--workers", "4", "--devices", "0,1,2,3")
    assert "share" not in result.stdout and not any("--gpu_memory" in run for run in runs)
    result, runs = launch_recorded(tmp_path / "given", "--workers", "2", "--", "--gpu_memory", "3000")
    assert "2 workers share the visible GPUs" in result.stdout  # no --devices: every run sees every GPU
    assert all(run.count("--gpu_memory") == 1 and run[-1] == "3000" for run in runs)


def test_launch_reports_failures_with_exit_status_1(tmp_path):
    fake = tmp_path / "failing"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    result = run("--launch", "--games", "pong", "--seeds", "0", "--root", str(tmp_path / "r"), "--python", str(fake))
    assert result.returncode == 1
    assert "FAILED (exit 3)" in result.stdout and "0 of 1 runs succeeded" in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["--games", "pongg"], "unknown game 'pongg'; did you mean pong?"),
    (["--seeds", "0", "0"], "--seeds has duplicates"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--format", "pbs"], "invalid choice: 'pbs'"),
    (["--", "--task", "atari_pong"], "--task is set by the sweep"),
    (["--", "--logdir=/x"], "--logdir is set by the sweep"),
    (["--", "steps", "5"], "arguments after -- must be train.py flags"),
    (["--launch", "--format", "slurm"], "cannot be combined with --format slurm"),
])
def test_user_mistakes_give_one_line_errors(argv, message):
    result = run(*argv)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert result.stdout == ""


def test_resolve_games_accepts_ale_style_names():
    assert sweep.resolve_games(["MsPacman", "montezumarevenge", "atari_up_n_down"]) == [
        "atari_montezuma_revenge", "atari_ms_pacman", "atari_up_n_down"]
    assert sweep.resolve_games(None) == list(GAMES)


def test_sweep_games_are_the_tasks_the_atari_env_accepts():
    from dreamerv2_tf.envs import atari

    assert [f"atari_{game}" for game in atari.GAMES] == list(GAMES)
