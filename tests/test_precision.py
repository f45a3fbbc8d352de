"""Mixed float16 trains like float32: 1,000 updates of the `debug` config on a replay of random Pong play.

Opt-in (`pytest -m slow`): float16 has no fast path on CPUs, so this takes several minutes. "Within
noise" is measured, not assumed: two float32 runs that differ only in the seed set the yardstick.
"""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dreamerv2_tf.loop.logger import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py"), "--configs", "defaults", "atari", "debug",
         "--task", "atari_pong", "--eval_eps", "0", "--checkpoint_every", "0"]
UPDATES = 1000
TRAIN_EVERY = 10  # the debug config's; offline runs advance the step counter by it per update
LOSSES = ("model_loss", "image_loss", "reward_loss", "critic_loss")


def train(*args: str) -> None:
    result = subprocess.run([*TRAIN, *args], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]


def curve(logdir: Path, key: str) -> np.ndarray:
    return np.array([row[key] for row in read_metrics(logdir) if key in row])


@pytest.mark.slow
def test_float16_matches_float32_over_1000_debug_updates(tmp_path):
    random_play = tmp_path / "random"
    train("--prefill", "3000", "--steps", "3000", "--pretrain", "0", "--logdir", str(random_play))
    runs = {}
    for name, precision, seed in (("fp32", "32", 0), ("fp32_seed1", "32", 1), ("fp16", "16", 0)):
        runs[name] = tmp_path / name
        train("--replay.directory", str(random_play / "train_episodes"), "--precision", precision,
              "--seed", str(seed), "--steps", str(UPDATES * TRAIN_EVERY), "--log_every", str(50 * TRAIN_EVERY),
              "--logdir", str(runs[name]))
    fp16 = read_metrics(runs["fp16"])
    assert any("model_loss_scale" in row for row in fp16)  # really ran in mixed precision
    for key in LOSSES:
        curves = {name: curve(logdir, key) for name, logdir in runs.items()}
        assert all(len(c) == UPDATES // 50 and np.isfinite(c).all() for c in curves.values()), (key, curves)
        assert curves["fp32"][-5:].mean() < curves["fp32"][:2].mean() or key == "critic_loss"  # it learns
        noise = np.abs(curves["fp32"] - curves["fp32_seed1"]).mean()
        gap = np.abs(curves["fp16"] - curves["fp32"]).mean()
        assert gap <= 2 * noise + 1e-3 * abs(curves["fp32"]).mean(), (key, gap, noise)
        assert math.isfinite(gap)
    skipped = [row["model_skipped_updates"] for row in fp16 if "model_skipped_updates" in row]
    assert skipped[-1] < 0.05 * UPDATES  # dynamic loss scaling skips only a few early updates
