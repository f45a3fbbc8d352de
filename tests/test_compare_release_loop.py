"""The loop's schedule and the replay's sequences against the authors' release's own code.

Both oracles of scripts/compare_release_loop.py run in the default suite, on 16 of the 48 schedule settings
and 25,000 draws per replay sample; the full grid with 100,000 draws is `pytest -m slow`. The release (PyPI
dreamerv2 2.2.0) is installed into `.release/` by scripts/setup.sh, or wherever DREAMERV2_RELEASE points;
without it these tests fail rather than skip.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
RELEASE = Path(os.environ.get("DREAMERV2_RELEASE", ROOT / ".release"))
spec = importlib.util.spec_from_file_location("compare_release_loop", ROOT / "scripts" / "compare_release_loop.py")
loop_oracle = importlib.util.module_from_spec(spec)
sys.modules["compare_release_loop"] = loop_oracle
spec.loader.exec_module(loop_oracle)


@pytest.fixture(scope="module")
def release_results():
    if not (RELEASE / "dreamerv2" / "train.py").exists():
        pytest.fail(f"the authors' release is not installed in {RELEASE}: run scripts/setup.sh, or pip install "
                    f"--no-deps --target {RELEASE} -r requirements-release.txt, or set DREAMERV2_RELEASE")
    request = {"schedule": loop_oracle.schedule_settings(quick=True), "replay": list(loop_oracle.REPLAY_SETTINGS),
               "draws": 25000}
    return request, loop_oracle.run_release(request, RELEASE)


def test_updates_and_evaluations_happen_at_the_release_steps(release_results, tmp_path):
    request, release = release_results
    full_grid = loop_oracle.schedule_settings()
    assert len(request["schedule"]) == 16
    for key in full_grid[0]:  # the subset keeps every value of each key of the grid
        assert {setting[key] for setting in request["schedule"]} == {setting[key] for setting in full_grid}, key
    for index, (setting, theirs) in enumerate(zip(request["schedule"], release["schedule"], strict=True)):
        ours = loop_oracle.our_schedule(setting, tmp_path / str(index))
        end = ours["end"]  # the release plays whole blocks of eval_every steps past `steps`; ours stops there
        assert end >= setting["steps"]
        for key in ("updates", "eval_episodes"):
            assert ours[key] == [step for step in theirs[key] if step <= end], (setting, key, ours, theirs)
        # Not vacuous: updates at the release's rate of train_steps / train_every per agent step, and
        # several evaluations.
        loop_updates = len(ours["updates"]) - 1 - setting["pretrain"]
        loop_steps = end - ours["updates"][0]
        rate = setting["train_steps"] / setting["train_every"]
        assert abs(loop_updates - rate * loop_steps) <= setting["train_steps"] + rate * setting["envs"], setting
        assert len(set(ours["eval_episodes"])) >= 2, setting


@pytest.mark.parametrize("name", list(loop_oracle.REPLAY_SETTINGS))
def test_replay_sequences_have_the_release_distribution(release_results, name, tmp_path):
    request, release = release_results
    ours = loop_oracle.our_replay(name, request["draws"], 0, tmp_path)
    report = loop_oracle.compare_replay(ours, release["replay"][name])
    assert all(item["ok"] for item in report.values()), report
    minlen, _, length, _ = loop_oracle.REPLAY_SETTINGS[name]
    starts = {start.split(":")[0] for start in ours["start"]}
    short = {str(index) for index, steps in enumerate(loop_oracle.REPLAY_EPISODES) if steps - 1 < minlen}
    assert starts and not starts & short  # episodes with fewer than minlen transitions are never sampled
    mid_window = np.mean([flag == "True" for flag in ours["mid_window"]])
    assert (mid_window == 0) == (minlen == length)  # whole windows under the named configs, else cut


def test_a_changed_rule_is_detected(release_results, tmp_path, monkeypatch):
    """The replay oracle has power: the previous rule (a start drawn from [0, T] and clipped) fails it."""
    request, release = release_results
    from dreamerv2_tf.loop.replay import Replay

    def old_window(self):
        episodes, _ = self._sampling_table()
        episode = episodes[int(self._rng.integers(0, len(episodes)))]
        total = len(episode["reward"])
        length = min(total, self.maxlen)
        start = min(int(self._rng.integers(0, total + 1)), total - length)
        window = {key: np.array(episode[key][start:start + length]) for key in self._signature}
        window["is_first"][0] = True
        return window

    monkeypatch.setattr(Replay, "sample_window", old_window)
    ours = loop_oracle.our_replay("vector", request["draws"], 0, tmp_path)
    report = loop_oracle.compare_replay(ours, release["replay"]["vector"])
    assert not report["episode_end"]["ok"] and report["episode_end"]["tv"] > 0.05, report


@pytest.mark.slow
def test_the_full_grid_and_100000_draws_agree():
    report = loop_oracle.compare(RELEASE, draws=100000)
    assert len(report["schedule"]) == 48 and len(report["replay"]) == len(loop_oracle.REPLAY_SETTINGS)
    assert report["ok"], report
