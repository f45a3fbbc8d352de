"""Episodes and their files.

Episode format (arrays with a leading time axis T): observation keys, 'action'
(float32, (T, A)), 'reward' (float32, (T,)), 'is_first', 'is_last',
'is_terminal' (bool, (T,)) and optional 'log_*' keys. Step t holds obs_t, the
action taken before it (zeros at t=0) and the reward received on arriving at it
(0 at t=0). File names are `<UTC time>-<uuid hex>-<length>.npz`, so sorting by
name sorts by time; files are written under a temporary name and renamed, so a
crash never leaves a partial `.npz` behind.
"""

from __future__ import annotations

import datetime
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED = ("action", "reward", "is_first", "is_last", "is_terminal")
FLAGS = ("is_first", "is_last", "is_terminal")
TEMP_SUFFIX = ".tmp"
# Names `episode_filename` writes: <UTC time>-<uuid hex>-<length>.npz. Other names carry no length.
FILENAME_RE = re.compile(r"\d{8}T\d{6}\.\d{6}-[0-9a-f]+-(\d+)")

Episode = dict[str, np.ndarray]
Signature = dict[str, tuple[tuple[int, ...], np.dtype]]


class EpisodeError(ValueError):
    """An episode that does not follow the format above."""


def normalize_episode(episode: Mapping[str, Any]) -> Episode:
    """Copy an episode into canonical dtypes; EpisodeError when keys or lengths are wrong."""
    missing = [key for key in REQUIRED if key not in episode]
    if missing:
        raise EpisodeError(f"episode is missing required keys {missing}; required: {', '.join(REQUIRED)}")
    out: Episode = {}
    for key, value in episode.items():
        array = np.array(value)  # copies, so later changes by the caller cannot alter stored data
        if array.dtype == object:
            raise EpisodeError(f"episode key '{key}' holds Python objects, not a numeric array")
        if key in FLAGS:
            array = array.astype(bool)
        elif key in ("action", "reward") or array.dtype == np.float64:
            array = array.astype(np.float32)
        out[key] = array
    lengths = {key: (array.shape[0] if array.ndim else None) for key, array in out.items()}
    length = lengths["reward"]
    bad = sorted(key for key, value in lengths.items() if value != length)
    if length is None or length < 1 or bad:
        raise EpisodeError(f"episode arrays must share one leading time axis of length >= 1; "
                           f"lengths by key: {lengths}")
    if out["action"].ndim != 2:
        raise EpisodeError(f"episode 'action' must have shape (T, A), got {out['action'].shape}")
    return out


def episode_length(episode: Mapping[str, np.ndarray]) -> int:
    return int(len(episode["reward"]))


def episode_signature(episode: Mapping[str, np.ndarray]) -> Signature:
    """Per-step shape and dtype of the keys that are sampled (everything except log_ keys)."""
    return {key: (tuple(value.shape[1:]), value.dtype) for key, value in episode.items()
            if not key.startswith("log_")}


def space_signature(obs_space: Mapping[str, Any], act_space: Mapping[str, Any]) -> Signature:
    """The signature of the episodes an env with these (gymnasium) spaces produces, after
    `normalize_episode`: flags bool, reward and action float32, float64 observations float32."""
    signature: Signature = {"reward": ((), np.dtype(np.float32))}
    signature.update({flag: ((), np.dtype(bool)) for flag in FLAGS})
    for key, space in obs_space.items():
        if key.startswith("log_") or key in REQUIRED:
            continue
        dtype = np.dtype(space.dtype)
        signature[key] = (tuple(space.shape), np.dtype(np.float32) if dtype == np.float64 else dtype)
    space = act_space["action"]
    size = int(space.n) if hasattr(space, "n") else int(np.prod(space.shape))  # Discrete: one-hot
    signature["action"] = ((size,), np.dtype(np.float32))
    return signature


def nonfinite_keys(episode: Mapping[str, np.ndarray]) -> list[str]:
    """Sampled keys with NaN or inf values (log_ keys are only logged, never trained on)."""
    return sorted(key for key, value in episode.items() if not key.startswith("log_")
                  and np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all())


def _describe(signature: Signature, key: str) -> str:
    shape, dtype = signature[key]
    return f"size {shape[0]}" if key == "action" and len(shape) == 1 else f"shape {shape} {dtype}"


def signature_difference(found: Signature, expected: Signature, source: str) -> str:
    """What differs, e.g. "action size 5 where the environment's spaces have action size 3"."""
    parts = []
    for key in sorted(set(found) | set(expected)):
        if key not in found:
            parts.append(f"no '{key}', which {source} have")
        elif key not in expected:
            parts.append(f"an extra key '{key}', which {source} do not have")
        elif found[key] != expected[key]:
            parts.append(f"{key} {_describe(found, key)} where {source} have {key} {_describe(expected, key)}")
    return "; ".join(parts)


def episode_filename(length: int) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%f")
    return f"{stamp}-{uuid.uuid4().hex}-{length}.npz"


def filename_length(path: str | Path) -> int | None:
    """The episode length a replay file name carries (see `episode_filename`); None for other names.

    Only names of the replay's own form count, so `junk-99999999.npz` claims no length.
    """
    match = FILENAME_RE.fullmatch(Path(path).stem)
    return int(match.group(1)) if match else None


def save_episode(directory: str | Path, episode: Mapping[str, np.ndarray]) -> Path:
    """Write one compressed .npz atomically: a temporary file in the same directory, then a rename."""
    directory = Path(directory)
    path = directory / episode_filename(episode_length(episode))
    temp = path.with_name(path.name + TEMP_SUFFIX)
    try:
        with open(temp, "wb") as file:
            np.savez_compressed(file, **episode)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def load_episode(path: str | Path) -> Episode:
    """Read and validate one episode file; EpisodeError (naming the file) when it is unusable."""
    try:
        with open(path, "rb") as file:
            head = file.read(6)
    except OSError as exc:
        raise EpisodeError(f"cannot read episode file {path}: {exc.strerror or exc}") from None
    # np.load takes anything without a zip or .npy header for a pickle, and then reports
    # "pickled data" for what is really a damaged or foreign file.
    if head.startswith(b"\x93NUMPY"):
        raise EpisodeError(f"skipping episode file {path}: a single .npy array, not an .npz archive of episode keys")
    if not head.startswith(b"PK"):
        raise EpisodeError(f"skipping episode file {path}: not an .npz archive (no zip header; damaged or "
                           "not written by numpy)")
    try:
        # Our own handle: np.load leaves its file open when a damaged zip fails to parse.
        with open(path, "rb") as file, np.load(file, allow_pickle=False) as data:
            raw = {key: data[key] for key in data.files}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise EpisodeError(f"cannot read episode file {path}: {type(exc).__name__}: {exc}") from None
    try:
        episode = normalize_episode(raw)
    except EpisodeError as exc:
        raise EpisodeError(f"skipping episode file {path}: {exc}") from None
    bad = nonfinite_keys(episode)
    if bad:
        raise EpisodeError(f"skipping episode file {path}: non-finite values (NaN or inf) in {', '.join(bad)}")
    return episode
