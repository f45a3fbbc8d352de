"""The memory the replays hold at capacity, against the machine's.

A replay keeps every episode it holds in RAM (`loop/replay.py`), in the dtypes of the episode format:
observations as the env gives them (float64 as float32), actions float32 (one-hot for discrete ones),
rewards float32 and the three flags as bytes. At capacity that is capacity x the bytes of one step, for
the training replay and the eval replay (a tenth of its capacity) together.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dreamerv2_tf.loop.episodes import space_signature

# Where cgroups (containers, SLURM jobs) state a memory limit: v2, then v1.
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def step_bytes(obs_space: Mapping[str, Any], act_space: Mapping[str, Any]) -> int:
    """Bytes of one stored step: the sampled keys and the `log_` keys, which the replay keeps too."""
    signature = dict(space_signature(obs_space, act_space))
    for key, space in obs_space.items():
        if key.startswith("log_"):
            dtype = np.dtype(space.dtype)
            signature[key] = (tuple(space.shape), np.dtype(np.float32) if dtype == np.float64 else dtype)
    return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for shape, dtype in signature.values())


def machine_memory() -> int | None:
    """Bytes of RAM this process may use: the physical memory, or a cgroup's limit when lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system that reports it
        total = None
    for path in CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) > 0:
            total = min(total, int(text)) if total else int(text)
        break
    return total


def gigabytes(count: int) -> str:
    return f"{count / 1e9:.3g} GB" if count >= 1e9 else f"{count / 1e6:.3g} MB"


def report_replay_memory(obs_space: Mapping[str, Any], act_space: Mapping[str, Any], capacity: int,
                         eval_capacity: int = 0, available: int | None = None) -> str:
    """The start-up line on the memory of the training and eval replays at their capacities (in steps); a
    RuntimeWarning when that exceeds the machine's memory (`available`, default `machine_memory()`)."""
    per_step = step_bytes(obs_space, act_space)
    if not capacity:
        return f"replay: {per_step:,} bytes per step, no capacity limit (replay.capacity 0)"
    steps = int(capacity) + int(eval_capacity)
    total = per_step * steps
    parts = f"{int(capacity):,} training and {int(eval_capacity):,} eval steps" if eval_capacity else f"{steps:,} steps"
    available = machine_memory() if available is None else available
    line = f"replay: {gigabytes(total)} at capacity ({per_step:,} bytes per step x {parts})"
    if available:
        line += f"; the machine has {gigabytes(available)}"
        if total > available:
            warnings.warn(f"the replay at capacity ({gigabytes(total)}) exceeds this machine's memory "
                          f"({gigabytes(available)}) and would run out of it; lower replay.capacity "
                          f"({available // per_step:,} steps fill the machine)", RuntimeWarning, stacklevel=2)
    return line
