"""State coverage of stored episodes (tools/coverage.py, scripts/coverage.py)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dreamerv2_tf.loop.episodes import save_episode
from dreamerv2_tf.tools import coverage

ROOT = Path(__file__).resolve().parent.parent


def write_run(directory, positions, rewards=None):
    """One episode file per array of positions [T, D], saved in order."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, values in enumerate(positions):
        values = np.asarray(values, np.float32)
        reward = np.full(len(values), 1.0 if rewards is None else rewards[index], np.float32)
        last = np.arange(len(values)) == len(values) - 1
        save_episode(directory, {"position": values, "reward": reward, "action": np.zeros((len(values), 1), np.float32),
                                 "is_first": np.arange(len(values)) == 0, "is_last": last, "is_terminal": last & False})
        time.sleep(0.002)  # file names carry the save time, which orders the episodes


def test_read_states_takes_the_first_steps_in_save_order(tmp_path):
    write_run(tmp_path, [np.zeros((4, 2)), np.ones((4, 2)), np.full((4, 2), 2.0)], rewards=[1.0, 2.0, 3.0])
    states = coverage.read_states(tmp_path, "position", 6)
    assert states.values.shape == (6, 2)
    np.testing.assert_array_equal(states.values[:, 0], [0, 0, 0, 0, 1, 1])
    assert states.episodes == 2
    assert states.returns == [4.0]  # the second episode is cut at the budget and has no return


def test_read_states_errors_name_the_problem(tmp_path):
    write_run(tmp_path, [np.zeros((4, 2))])
    with pytest.raises(ValueError, match="fewer than the 10"):
        coverage.read_states(tmp_path, "position", 10)
    with pytest.raises(ValueError, match="no key 'velocity'"):
        coverage.read_states(tmp_path, "velocity", 2)
    with pytest.raises(ValueError, match="no episode files"):
        coverage.read_states(tmp_path / "empty", "position", 2)


def test_a_corrupt_episode_is_skipped_with_a_warning(tmp_path):
    write_run(tmp_path, [np.zeros((3, 1)), np.ones((3, 1))])
    first = sorted(tmp_path.glob("*.npz"))[0]
    first.write_bytes(first.read_bytes()[:40])  # truncated
    with pytest.warns(UserWarning, match="cannot read episode file"):
        states = coverage.read_states(tmp_path, "position", 3)
    np.testing.assert_array_equal(states.values[:, 0], [1, 1, 1])


def test_occupied_cells_share_one_grid():
    line = np.stack([np.linspace(0, 1, 100), np.zeros(100)], 1)   # spans dimension 0 only
    spot = np.full((100, 2), 0.5)                                  # one point
    square = np.random.default_rng(0).uniform(0, 1, (2000, 2))     # fills the square
    cells, grid = coverage.occupied_cells({"line": line, "spot": spot, "square": square}, bins=10)
    assert grid == 100
    assert cells == {"line": 10, "spot": 1, "square": 100}


def test_script_prints_a_table_and_a_one_line_error(tmp_path):
    write_run(tmp_path / "wide" / "train_episodes", [np.linspace(-1, 1, 50)[:, None]])
    write_run(tmp_path / "narrow" / "train_episodes", [np.linspace(-0.05, 0.05, 50)[:, None]])
    command = [sys.executable, str(ROOT / "scripts" / "coverage.py"), f"wide={tmp_path / 'wide'}",
               f"narrow={tmp_path / 'narrow'}", "--key", "position", "--steps", "50", "--bins", "20"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = {line.split("|")[1].strip(): line.split("|") for line in result.stdout.splitlines()[2:]}
    assert int(rows["wide"][4]) == 20 and int(rows["narrow"][4]) == 2
    result = subprocess.run(command[:-4] + ["--steps", "500"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_script_dims_selects_dimensions_and_refuses_missing_ones(tmp_path):
    # Dimension 0 spans [-1, 1] in both runs; dimension 1 only in "wide".
    ramp = np.linspace(-1, 1, 50)
    write_run(tmp_path / "wide", [np.stack([ramp, ramp], 1)])
    write_run(tmp_path / "flat", [np.stack([ramp, np.zeros(50)], 1)])
    command = [sys.executable, str(ROOT / "scripts" / "coverage.py"), f"wide={tmp_path / 'wide'}",
               f"flat={tmp_path / 'flat'}", "--key", "position", "--steps", "50", "--bins", "10", "--json"]
    cases = (("0", {"wide": 10, "flat": 10}), ("1", {"wide": 10, "flat": 1}), (None, {"wide": 10, "flat": 10}))
    for dims, expected in cases:
        chosen = ["--dims", dims] if dims else []
        result = subprocess.run(command + chosen, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        rows = json.loads(result.stdout)
        assert {name: row["cells"] for name, row in rows.items()} == expected
        assert rows["wide"]["grid"] == (100 if dims is None else 10)
    result = subprocess.run(command + ["--dims", "0,2"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "dimensions 0 to 1" in result.stderr
