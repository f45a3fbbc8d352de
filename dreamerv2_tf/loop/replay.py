"""Experience replay: a directory of .npz episodes, held in memory and sampled as fixed-length sequences.

The episode format and files: `dreamerv2_tf.loop.episodes`.

Sampling follows the authors' release. An episode is held for sampling only
when it has at least `minlen` transitions (steps after the first); shorter ones
are saved to disk but not held, and `capacity` counts the transitions held. With
`sample: episode` (the default, the release's rule) each held episode is
equally likely, whatever its length; with `step` an episode is drawn in
proportion to its length. From the episode a window is cut (`sample_window`),
and windows are cut into sequences of the dataset's length (`chunks`): as one
stream, so that a sequence may begin inside a window with 'is_first' False
(the release's rule), or each sequence from a fresh window. 'is_first' is True
on the first step of every window, so the model resets its state there. With
`ongoing`, episodes still being collected are sampled too once long enough.

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
CHUNK_MODES = CHOICES[r"dataset\.chunks"]
# With env spaces, loading gives up after this many non-matching files when none matched so far.
MISMATCH_GIVE_UP = 10



class Replay:
    """FIFO replay of whole episodes, mirrored to `directory` (files stay on disk when evicted).

    `signature` (see `space_signature`) fixes the keys, shapes and dtypes every episode must have;
    without it they are taken from the files at load (the majority) or from the first episode added.
    """

    def __init__(self, directory: str | Path, capacity: int = 0, minlen: int = 1, maxlen: int = 0,
                 prioritize_ends: bool = False, seed: int = 0, load: bool = True, sample: str = "episode",
                 signature: Mapping[str, tuple[tuple[int, ...], Any]] | None = None, ongoing: bool = False,
                 warn_short: bool = True):
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
        self.ongoing = bool(ongoing)
        self.warn_short = bool(warn_short)  # warn once when an episode is too short to hold
        self._rng = np.random.default_rng(seed)
        self._lock = threading.RLock()
        self._episodes: collections.deque[Episode] = collections.deque()
        self._num_steps = 0
        self._total_steps = 0
        self._total_episodes = 0
        self._loaded_episodes = 0
        self._skipped_files = 0
        self._refused_episodes = 0
        self._short_episodes = 0
        self._file_lengths: dict[str, int] = {}
        self._signature: Signature | None = None
        self._from_spaces = signature is not None
        if signature is not None:
            self._signature = {key: (tuple(shape), np.dtype(dtype)) for key, (shape, dtype) in signature.items()}
        self._buffers: dict[int, dict[str, list]] = {}  # unfinished episodes by worker: key -> steps
        self._cumulative: np.ndarray | None = None  # cached sampling weights; None when stale
        self._eligible: list[Mapping[str, Any]] = []
        if load:
            self._load()

    # ---- adding -------------------------------------------------------------------------------

    def add_step(self, transition: Mapping[str, Any], worker: int = 0) -> Path | None:
        """Buffer one step of `worker`'s episode; at is_last the episode is saved and added."""
        with self._lock:  # with `ongoing` the sampler reads the buffers
            buffer = self._buffers.get(worker)
            if buffer is None or transition["is_first"]:  # a new episode; an unfinished one was abandoned
                buffer = self._buffers[worker] = {key: [] for key in transition}
            for key, value in transition.items():
                buffer[key].append(np.array(value))
            if self.ongoing:
                self._cumulative = None
            if not transition["is_last"]:
                return None
            del self._buffers[worker]
        return self.add_episode({key: np.stack(values) for key, values in buffer.items()})

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

    def sample_window(self) -> Episode:
        """One window of an episode, as the authors' release draws it, without log_ keys.

        Its length is min(T, maxlen) (T: the episode's steps) shortened by a uniform draw from
        [0, minlen) and kept at least minlen, so that windows of equally long episodes do not all end
        together. Its start is uniform over the possible starts, or with `prioritize_ends`
        min(U{0, .., T - length + minlen}, T - length): the last start gets minlen + 1 draws.
        """
        with self._lock:
            episodes, cumulative = self._sampling_table()
            if self.sample == "episode":  # every eligible episode equally likely
                index = int(self._rng.integers(0, len(episodes)))
            else:  # in proportion to length: every stored step equally likely
                index = int(np.searchsorted(cumulative, self._rng.uniform(0, cumulative[-1]), side="right"))
            episode = episodes[min(index, len(episodes) - 1)]
            total = episode_length(episode)
            length = min(total, self.maxlen) if self.maxlen else total
            length = max(self.minlen, length - int(self._rng.integers(0, self.minlen)))
            upper = total - length + 1 + (self.minlen if self.prioritize_ends else 0)
            start = min(int(self._rng.integers(0, upper)), total - length)
            window = {key: np.array(episode[key][start:start + length], dtype)
                      for key, (_, dtype) in self._signature.items()}
        window["is_first"][0] = True
        return window

    def chunks(self, length: int, mode: str = "stream") -> Iterator[Episode]:
        """Endless sequences of exactly `length` steps cut from windows (`sample_window`).

        `stream` and `shared` (the release's cut): windows follow each other and are cut into chunks
        wherever the length falls, so a chunk may begin inside a window with is_first False; the model
        then continues from the state the previous chunk of this stream ended in. `fresh`: every
        chunk starts with a new window and the rest of the window that ends it is dropped.
        """
        if length < 1:
            raise ValueError(f"chunk length must be positive, got {length}")
        if mode not in CHUNK_MODES:
            raise ValueError(f"chunks must be one of {', '.join(CHUNK_MODES)}, got '{mode}'")
        window, position = self.sample_window(), 0
        while True:
            if mode == "fresh" and position:
                window, position = self.sample_window(), 0
            pieces, need = [], length
            while need:
                take = min(need, episode_length(window) - position)
                pieces.append({key: value[position:position + take] for key, value in window.items()})
                position, need = position + take, need - take
                if position == episode_length(window):
                    window, position = self.sample_window(), 0
            yield {key: np.concatenate([piece[key] for piece in pieces]) for key in pieces[0]}

    def dataset(self, batch: int, length: int, chunks: str = "stream", prefetch: bool = True, turns: int = 1):
        """tf.data.Dataset of dicts [batch, length, ...]; row b of every batch continues stream b
        (see `chunks`), so a state carried from one batch to the next belongs to the same row.
        `shared` is the release's dataset: the rows take consecutive chunks of one stream, so the
        state carried into row b was left by another part of the stream.

        With `turns` > 1 the batches take turns between that many groups of streams: under
        tf.distribute the replicas of a worker take consecutive batches, so each replica keeps
        its own streams. Without `prefetch` each batch is sampled when it is requested, so the
        batches depend only on the seed and the episodes added so far (reproducible runs).
        """
        import tensorflow as tf

        if batch < 1 or length < 1 or turns < 1:
            raise ValueError(f"dataset batch, length and turns must be positive, got batch={batch}, "
                             f"length={length}, turns={turns}")
        with self._lock:
            self._sampling_table()  # fails early with a clear message when nothing can be sampled
            signature = dict(self._signature)
        spec = {key: tf.TensorSpec((batch, length, *shape), tf.as_dtype(dtype)) for key, (shape, dtype) in
                signature.items()}

        def generate() -> Iterator[Episode]:
            if chunks == "shared":  # one generator, asked once per row
                groups = [[self.chunks(length, chunks)] * batch for _ in range(turns)]
            else:
                groups = [[self.chunks(length, chunks) for _ in range(batch)] for _ in range(turns)]
            while True:
                for streams in groups:
                    rows = [next(stream) for stream in streams]
                    yield {key: np.stack([row[key] for row in rows]) for key in signature}

        dataset = tf.data.Dataset.from_generator(generate, output_signature=spec)
        if prefetch:
            return dataset.prefetch(tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.experimental_optimization.inject_prefetch = False  # tf.data would otherwise add one
        return dataset.with_options(options)

    # ---- counts -------------------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        """Transitions (agent steps) of the episodes held in memory."""
        return self._num_steps

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    @property
    def total_steps(self) -> int:
        """Transitions ever added to this replay, including episodes loaded from disk at start."""
        return self._total_steps

    @property
    def total_episodes(self) -> int:
        return self._total_episodes

    @property
    def short_episodes(self) -> int:
        """Episodes added or loaded with fewer than `minlen` transitions: on disk, not held."""
        return self._short_episodes

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
            "replay_short_episodes": self._short_episodes,
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
                    steps += self._held_length(episode)
                    if self.capacity and steps >= self.capacity:
                        break
            if candidates:
                votes = collections.Counter(tuple(sorted(episode_signature(ep).items())) for _, ep in candidates)
                self._signature = dict(votes.most_common(1)[0][0])
            steps = 0
            for path, episode in candidates:
                if episode_signature(episode) == self._signature:
                    loaded.append((path, episode))
                    steps += self._held_length(episode)
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
                steps += self._held_length(episode)
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

    def _held_length(self, episode: Episode) -> int:
        """The transitions an episode adds to the replay's memory: none when it is too short to hold."""
        length = transitions(episode)
        return length if length >= self.minlen else 0

    def _insert(self, episode: Episode) -> None:
        """Hold an episode for sampling, unless it has fewer than `minlen` transitions (its file stays)."""
        length = transitions(episode)
        with self._lock:
            self._total_steps += length
            self._total_episodes += 1
            if length < self.minlen:
                if self.warn_short and not self._short_episodes:
                    warnings.warn(f"episodes with fewer than minlen={self.minlen} transitions are kept in "
                                  f"{self.directory} but not sampled (first one: {length})", RuntimeWarning,
                                  stacklevel=3)
                self._short_episodes += 1
                return
            self._episodes.append(episode)
            self._num_steps += length
            # FIFO eviction of whole episodes by transitions held; the newest one always stays.
            while self.capacity and self._num_steps > self.capacity and len(self._episodes) > 1:
                self._num_steps -= transitions(self._episodes.popleft())
            self._cumulative = None

    def _sampling_table(self) -> tuple[list[Mapping[str, Any]], np.ndarray]:
        if self._cumulative is None:
            self._eligible = list(self._episodes)
            if self.ongoing:  # unfinished episodes, as soon as they are long enough
                self._eligible += [buffer for buffer in self._buffers.values() if transitions(buffer) >= self.minlen]
            lengths = np.array([episode_length(ep) for ep in self._eligible], np.float64)
            self._cumulative = np.cumsum(lengths)
        if not self._eligible:
            raise ValueError(f"replay in {self.directory} has no episodes with at least {self.minlen} "
                             f"transitions to sample ({self._short_episodes} shorter ones); collect data first")
        return self._eligible, self._cumulative


def transitions(episode: Mapping[str, Any]) -> int:
    """Agent steps of an episode: its steps after the first (what minlen and capacity count)."""
    return episode_length(episode) - 1
