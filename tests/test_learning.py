"""The whole agent learns: a short CartPole run must beat the random policy clearly.

The full check (`--configs defaults vector --steps 100000`, eval return >= 450) is in
the README; this short version uses a smaller batch and more frequent updates so it
finishes in under 3 minutes on 2 CPU cores; being that long, it is opt-in (`pytest -m slow`).
`--deterministic true` makes the run the same on every run on a given machine, so the test does not
depend on a lucky draw.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from dreamerv2_tf.loop.logger import read_metrics

ROOT = Path(__file__).resolve().parent.parent
RANDOM_CARTPOLE = 22.0  # mean return of uniform random actions
SHORT_RUN = [
    "--configs", "defaults", "vector", "--task", "gym_CartPole-v1", "--seed", "0", "--deterministic", "true",
    "--steps", "3002", "--prefill", "1000", "--train_every", "2",
    "--dataset.batch", "8", "--dataset.length", "16", "--replay.maxlen", "16",
    "--eval_every", "500", "--eval_eps", "5", "--log_every", "500", "--checkpoint_every", "0",
]


@pytest.mark.slow
def test_short_cartpole_run_beats_random_policy(tmp_path):
    logdir = tmp_path / "cartpole"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *SHORT_RUN, "--logdir", str(logdir)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    returns = [row["eval_return"] for row in read_metrics(logdir) if row.get("eval_return") is not None]
    assert len(returns) >= 4, returns
    # The first evaluation happens right after prefill, before any learning.
    assert returns[0] < 3 * RANDOM_CARTPOLE
    assert max(returns[1:]) > 4 * RANDOM_CARTPOLE, returns
