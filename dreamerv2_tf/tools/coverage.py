"""State coverage of stored episodes: how widely runs spread over a vector observation.

Runs are compared on the first N agent steps of their `train_episodes` (file names sort by
save time). Each run's values of one vector key fill a joint histogram whose edges span the
pooled range of all runs, so every run is binned on the same grid; the number of occupied
cells is its coverage. Pure numpy: no TensorFlow import.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dreamerv2_tf.loop.episodes import EpisodeError, load_episode


@dataclass
class States:
    values: np.ndarray      # [steps, dims] of the key, episodes concatenated in save order
    returns: list[float]    # sum of 'reward' of each episode that ends within the budget
    episodes: int           # episode files read (the last may be cut at the budget)


def read_states(directory: str | Path, key: str, steps: int) -> States:
    """The first `steps` rows of `key` from the episodes in `directory`; ValueError if there are fewer."""
    files = sorted(Path(directory).glob("*.npz"))
    if not files:
        raise ValueError(f"no episode files in {directory}")
    rows, returns, read, total = [], [], 0, 0
    for path in files:
        if total >= steps:
            break
        try:
            episode = load_episode(path)
        except EpisodeError as exc:
            warnings.warn(str(exc), stacklevel=2)
            continue
        if key not in episode:
            raise ValueError(f"episode {path.name} has no key '{key}'; keys: {', '.join(sorted(episode))}")
        values = np.asarray(episode[key], np.float64).reshape(len(episode[key]), -1)
        take = min(len(values), steps - total)
        rows.append(values[:take])
        if take == len(values) and "reward" in episode:
            returns.append(float(np.sum(episode["reward"])))
        read, total = read + 1, total + take
    if total < steps:
        raise ValueError(f"{directory} holds {total} steps of '{key}', fewer than the {steps} asked for")
    return States(np.concatenate(rows), returns, read)


def occupied_cells(runs: Mapping[str, np.ndarray], bins: int) -> tuple[dict[str, int], int]:
    """Cells of a shared `bins`-per-dimension grid that each run's values touch, and the grid's size."""
    pooled = np.concatenate(list(runs.values()))
    low, high = pooled.min(0), pooled.max(0)
    high = np.where(high > low, high, low + 1.0)  # a constant dimension gets one occupied bin
    edges = [np.linspace(lo, hi, bins + 1) for lo, hi in zip(low, high, strict=True)]
    counts = {name: int(np.count_nonzero(np.histogramdd(values, bins=edges)[0])) for name, values in runs.items()}
    return counts, bins ** pooled.shape[1]


__all__ = ["States", "read_states", "occupied_cells"]
