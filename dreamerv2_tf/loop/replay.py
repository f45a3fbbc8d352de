"""Experience replay: a directory of .npz episodes, held in memory and sampled as fixed-length sequences.

The episode format and files: `dreamerv2_tf.loop.episodes`.

Sampling (`sample`, config key `replay.sample`): only episodes with at least
`minlen` steps are eligible. With `episode` (the default, the authors'
release's rule) each eligible episode is equally likely, whatever its length;
with `step` an episode is drawn with probability proportional to its length, so
every stored step is equally likely. The start index is uniform, or with
`prioritize_ends` drawn from [0, T] and clipped to T - length so that episode
ends are seen often (paper section 2.1). A sequence shorter than requested is
continued with another sampled episode; 'is_first' is True on the first step of
every piece, so the model resets its state at each boundary.

Validation: the keys, per-step shapes and dtypes every episode must have (its
signature) come from the environment's spaces when they are given
(`space_signature`); without them, from the signature most files in the folder
share, so one odd file is skipped instead of making every other file differ.
Files that cannot be read, do not follow the format, do not match or hold
non-finite (NaN, inf) values in a sampled key are skipped at load with a
warning; an episode with non-finite values is refused by `add_episode` with a
warning and not stored.
"""

from __future__ import annotations

import collections
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dreamerv2_tf.config import CHOICES
from dreamerv2_tf.loop.episodes import (
    Episode,
    EpisodeError,
    Signature,
    episode_length,
    episode_signature,
    load_episode,
    nonfinite_keys,
    normalize_episode,
    save_episode,
    signature_difference,
)

SAMPLE_MODES = CHOICES[r"replay\.sample"]
# With env spaces, loading gives up after this many non-matching files when none matched so far.
MISMATCH_GIVE_UP = 10



class Replay:
    """FIFO replay of whole episodes, mirrored to `directory` (files stay on disk when evicted).

    `signature` (see `space_signature`) fixes the keys, shapes and dtypes every episode must have;
    without it they are taken from the files at load (the majority) or from the first episode added.
    """

    def __init__(self, directory: str | Path, capacity: int = 0, minlen: int = 1, maxlen: int = 0,
                 prioritize_ends: bool = False, seed: int = 0, load: bool = True, sample: str = "episode",
                 signature: Mapping[str, tuple[tuple[int, ...], Any]] | None = None):
        if capacity < 0:
            raise ValueError(f"replay capacity must be 0 (unlimited) or positive, got {capacity}")
        if minlen < 1:
            raise ValueError(f"replay minlen must be at least 1, got {minlen}")
        if maxlen < 0:
            raise ValueError(f"replay maxlen must be 0 (no limit) or positive, got {maxlen}")
        if sample not in SAMPLE_MODES:
            raise ValueError(f"replay sample must be one of {', '.join(SAMPLE_MODES)}, got '{sample}'")
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity = int(capacity)
        self.minlen = int(minlen)
        self.maxlen = int(maxlen)
        self.prioritize_ends = bool(prioritize_ends)
        self.sample = sample
        self._rng = np.random.default_rng(seed)
        self._lock = threading.RLock()
        self._episodes: collections.deque[Episode] = collections.deque()
        self._num_steps = 0
        self._total_steps = 0
        self._total_episodes = 0
        self._loaded_episodes = 0
        self._skipped_files = 0
        self._refused_episodes = 0
        self._file_lengths: dict[str, int] = {}
        self._signature: Signature | None = None
        self._from_spaces = signature is not None
        if signature is not None:
            self._signature = {key: (tuple(shape), np.dtype(dtype)) for key, (shape, dtype) in signature.items()}
        self._buffers: dict[int, list[dict[str, np.ndarray]]] = {}
        self._cumulative: np.ndarray | None = None  # cached sampling weights; None when stale
        self._eligible: list[Episode] = []
        if load:
            self._load()

    # ---- adding -------------------------------------------------------------------------------

    def add_step(self, transition: Mapping[str, Any], worker: int = 0) -> Path | None:
        """Buffer one step of `worker`'s episode; at is_last the episode is saved and added."""
        buffer = self._buffers.setdefault(worker, [])
        if transition["is_first"] and buffer:
            buffer.clear()  # the previous episode was abandoned (e.g. the driver was reset)
        buffer.append({key: np.array(value) for key, value in transition.items()})
        if not transition["is_last"]:
            return None
        steps = self._buffers.pop(worker)
        episode = {key: np.stack([step[key] for step in steps]) for key in steps[0]}
        return self.add_episode(episode)

    def add_episode(self, episode: Mapping[str, Any]) -> Path | None:
        """Save one episode to the directory and add it to memory; returns the file path.

        An episode with NaN or inf values is refused with a warning (None): training on it would
        turn every weight into NaN. Other format errors raise EpisodeError.
        """
        episode = normalize_episode(episode)
        bad = nonfinite_keys(episode)
        if bad:
            self._refused_episodes += 1
            warnings.warn(f"episode of {episode_length(episode)} steps not stored in {self.directory}: non-finite "
                          f"values (NaN or inf) in {', '.join(bad)}", RuntimeWarning, stacklevel=2)
            return None
        self._check_signature(episode, "episode")
        path = save_episode(self.directory, episode)
        self._insert(episode)
        return path

    # ---- sampling -----------------------------------------------------------------------------

    def sample_sequence(self, length: int | None = None) -> Episode:
        """One sequence of exactly `length` steps (default maxlen) without log_ keys."""
        length = int(length or self.maxlen)
        if length < 1:
            raise ValueError("sample_sequence needs a positive length (or a replay maxlen)")
        pieces = []
        need = length
        with self._lock:
            episodes, cumulative = self._sampling_table()
            keys = list(self._signature)
            while need > 0:
                if self.sample == "episode":  # every eligible episode equally likely
                    index = int(self._rng.integers(0, len(episodes)))
                else:  # in proportion to length: every stored step equally likely
                    index = int(np.searchsorted(cumulative, self._rng.uniform(0, cumulative[-1]), side="right"))
                episode = episodes[min(index, len(episodes) - 1)]
                total = episode_length(episode)
                take = min(need, self.maxlen) if self.maxlen else need
                if self.prioritize_ends:
                    start = min(int(self._rng.integers(0, total + 1)), total - take)
                else:
                    start = int(self._rng.integers(0, max(total - take, 0) + 1))
                start = max(start, 0)
                piece = {key: episode[key][start:start + take] for key in keys}
                piece["is_first"] = piece["is_first"].copy()
                piece["is_first"][0] = True
                pieces.append(piece)
                need -= len(piece["reward"])
        if len(pieces) == 1:
            return {key: np.array(value) for key, value in pieces[0].items()}
        return {key: np.concatenate([piece[key] for piece in pieces]) for key in keys}

    def dataset(self, batch: int, length: int, prefetch: bool = True):
        """tf.data.Dataset of dicts [batch, length, ...], sampled in the background and prefetched.

        Without `prefetch` each batch is sampled when it is requested, so the batches depend only on
        the seed and the episodes added so far, not on thread timing (reproducible runs).
        """
        import tensorflow as tf

        if batch < 1 or length < 1:
            raise ValueError(f"dataset batch and length must be positive, got batch={batch}, length={length}")
        with self._lock:
            self._sampling_table()  # fails early with a clear message when nothing can be sampled
            signature = dict(self._signature)
        spec = {key: tf.TensorSpec((length, *shape), tf.as_dtype(dtype)) for key, (shape, dtype) in
                signature.items()}

        def generate() -> Iterator[Episode]:
            while True:
                yield self.sample_sequence(length)

        dataset = tf.data.Dataset.from_generator(generate, output_signature=spec)
        dataset = dataset.batch(batch, drop_remainder=True)
        if prefetch:
            return dataset.prefetch(tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.experimental_optimization.inject_prefetch = False  # tf.data would otherwise add one
        return dataset.with_options(options)

    # ---- counts -------------------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        """Steps of the episodes held in memory."""
        return self._num_steps

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    @property
    def total_steps(self) -> int:
        """Steps ever added to this replay, including episodes loaded from disk at start."""
        return self._total_steps

    @property
    def total_episodes(self) -> int:
        return self._total_episodes

    @property
    def refused_episodes(self) -> int:
        """Episodes `add_episode` refused because of non-finite values."""
        return self._refused_episodes

    def file_lengths(self) -> dict[str, int]:
        """Steps of each file the load read, by file name: 0 for files it skipped.

        Files beyond the capacity are not read and not listed.
        """
        return dict(self._file_lengths)

    def stats(self) -> dict[str, int]:
        return {
            "replay_steps": self.num_steps,
            "replay_episodes": self.num_episodes,
            "replay_total_steps": self.total_steps,
            "replay_total_episodes": self.total_episodes,
            "replay_loaded_episodes": self._loaded_episodes,
            "replay_skipped_files": self._skipped_files,
            "replay_refused_episodes": self._refused_episodes,
        }

    def episodes(self) -> list[Episode]:
        """The episodes in memory, oldest first (shared arrays; do not modify them)."""
        with self._lock:
            return list(self._episodes)

    # ---- internals ----------------------------------------------------------------------------

    def _load(self) -> None:
        """Load existing episodes newest first until the capacity is reached.

        Without an expected signature, the files read up to the capacity vote: the signature most of
        them share is expected (ties: the newest file's), the others are skipped.
        """
        paths = iter(sorted(self.directory.glob("*.npz"), key=lambda item: item.name, reverse=True))
        loaded: list[tuple[Path, Episode]] = []
        mismatched: list[tuple[Path, Signature]] = []
        steps = 0

        def read(path: Path) -> Episode | None:
            try:
                return load_episode(path)
            except EpisodeError as exc:
                self._skip(path, str(exc))
                return None

        if self._signature is None:
            candidates: list[tuple[Path, Episode]] = []
            for path in paths:
                episode = read(path)
                if episode is not None:
                    candidates.append((path, episode))
                    steps += episode_length(episode)
                    if self.capacity and steps >= self.capacity:
                        break
            if candidates:
                votes = collections.Counter(tuple(sorted(episode_signature(ep).items())) for _, ep in candidates)
                self._signature = dict(votes.most_common(1)[0][0])
            steps = 0
            for path, episode in candidates:
                if episode_signature(episode) == self._signature:
                    loaded.append((path, episode))
                    steps += episode_length(episode)
                else:
                    mismatched.append((path, episode_signature(episode)))
        for path in paths:  # the rest, against the now known signature
            if self.capacity and steps >= self.capacity:
                break
            if self._from_spaces and not loaded and len(mismatched) >= MISMATCH_GIVE_UP:
                break  # a folder of another task's episodes: no need to read it all
            episode = read(path)
            if episode is None:
                continue
            if episode_signature(episode) == self._signature:
                loaded.append((path, episode))
                steps += episode_length(episode)
            else:
                mismatched.append((path, episode_signature(episode)))
        self._refuse_or_skip(mismatched, len(loaded))
        for path, episode in loaded:
            self._file_lengths[path.name] = episode_length(episode)
        for _, episode in reversed(loaded):
            self._insert(episode)
        self._loaded_episodes = len(loaded)

    def _refuse_or_skip(self, mismatched: list[tuple[Path, Signature]], matched: int) -> None:
        """Skip the files whose signature differs, each with a warning; refuse a folder where most do."""
        source = "the environment's spaces" if self._from_spaces else "most files in the folder"
        if self._from_spaces and len(mismatched) > max(matched, 1):
            # Most files (and more than a single odd one) disagree with the env: the folder holds another
            # task's episodes. One line naming the difference beats a warning per file and a Keras shape
            # error at the first update.
            common, count = collections.Counter(tuple(sorted(sig.items())) for _, sig in mismatched).most_common(1)[0]
            raise EpisodeError(
                f"the episodes in {self.directory} do not fit the environment: {count} of "
                f"{len(mismatched) + matched} files read have "
                f"{signature_difference(dict(common), self._signature, source)} (another task's episodes?)")
        for path, signature in mismatched:
            self._skip(path, f"skipping episode file {path}: "
                             f"{signature_difference(signature, self._signature, source)}")

    def _skip(self, path: Path, message: str) -> None:
        self._skipped_files += 1
        self._file_lengths[path.name] = 0
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _check_signature(self, episode: Episode, what: str) -> None:
        signature = episode_signature(episode)
        with self._lock:
            if self._signature is None:
                self._signature = signature
                return
            expected = self._signature
        if signature != expected:
            source = "the environment's spaces" if self._from_spaces else "the replay's episodes"
            raise EpisodeError(f"{what} does not match the replay's keys, shapes or dtypes: "
                               f"{signature_difference(signature, expected, source)}")

    def _insert(self, episode: Episode) -> None:
        with self._lock:
            self._episodes.append(episode)
            length = episode_length(episode)
            self._num_steps += length
            self._total_steps += length
            self._total_episodes += 1
            # FIFO eviction of whole episodes; the newest one always stays.
            while self.capacity and self._num_steps > self.capacity and len(self._episodes) > 1:
                self._num_steps -= episode_length(self._episodes.popleft())
            self._cumulative = None

    def _sampling_table(self) -> tuple[list[Episode], np.ndarray]:
        if self._cumulative is None:
            self._eligible = [ep for ep in self._episodes if episode_length(ep) >= self.minlen]
            lengths = np.array([episode_length(ep) for ep in self._eligible], np.float64)
            self._cumulative = np.cumsum(lengths)
        if not self._eligible:
            raise ValueError(f"replay in {self.directory} has no episodes with at least {self.minlen} "
                             f"steps to sample ({self.num_episodes} episodes held); collect data first")
        return self._eligible, self._cumulative
