"""Replay: episode files on disk, loading, eviction and sequence sampling."""

import collections
import itertools
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
from gymnasium import spaces

from dreamerv2_tf.loop.episodes import (
    EpisodeError,
    episode_filename,
    filename_length,
    load_episode,
    save_episode,
    space_signature,
)
from dreamerv2_tf.loop.replay import Replay


def make_episode(length, marker=0.0, image=True, actions=3):
    """A synthetic episode whose 'vector' encodes (marker, step) so samples can be traced back."""
    steps = np.arange(length)
    episode = {
        "vector": np.stack([np.full(length, marker), steps], -1).astype(np.float32),
        "action": np.eye(actions, dtype=np.float32)[steps % actions],
        "reward": steps.astype(np.float32),
        "is_first": steps == 0,
        "is_last": steps == length - 1,
        "is_terminal": steps == length - 1,
        "log_score": np.full(length, 7, np.int64),
    }
    episode["action"][0] = 0
    if image:
        episode["image"] = (np.arange(length * 8 * 8).reshape(length, 8, 8, 1) % 251).astype(np.uint8)
    return episode


def test_round_trip_files_and_counts(tmp_path):
    replay = Replay(tmp_path / "eps")
    episodes = [make_episode(12, 1.0), make_episode(5, 2.0)]
    paths = [replay.add_episode(episode) for episode in episodes]
    for path, episode in zip(paths, episodes, strict=True):
        assert re.fullmatch(r"\d{8}T\d{6}\.\d{6}-[0-9a-f]{32}-" + str(len(episode["reward"])) + r"\.npz", path.name)
    assert sorted(paths) == paths  # names sort by time
    # Steps are counted as transitions, the steps after an episode's first (agent steps).
    assert (replay.num_steps, replay.num_episodes, replay.total_steps) == (15, 2, 15)
    reloaded = Replay(tmp_path / "eps")
    assert reloaded.stats()["replay_loaded_episodes"] == 2 and reloaded.total_steps == 15
    for original, loaded in zip(episodes, reloaded.episodes(), strict=True):
        assert original.keys() == loaded.keys()
        for key in original:
            np.testing.assert_array_equal(original[key], loaded[key])
            assert loaded[key].dtype == (np.float32 if key == "action" else original[key].dtype)
    assert not Replay(tmp_path / "eps", load=False).num_episodes


def test_add_step_assembles_episodes_per_worker(tmp_path):
    replay = Replay(tmp_path)
    first, second = make_episode(4, 1.0, image=False), make_episode(3, 2.0, image=False)

    def steps(episode, t):
        return {key: value[t] for key, value in episode.items()}

    for t in range(4):  # interleave two workers
        path = replay.add_step(steps(first, t), worker=0)
        assert (path is None) == (t < 3)
        if t < 3:
            replay.add_step(steps(second, t), worker=1)
    assert path.exists() and path.name.endswith("-4.npz")
    stored = {episode["vector"][0, 0]: episode for episode in replay.episodes()}
    assert set(stored) == {1.0, 2.0}
    for original in (first, second):
        for key in original:
            np.testing.assert_array_equal(stored[original["vector"][0, 0]][key], original[key])


def test_add_step_drops_abandoned_episode(tmp_path):
    replay = Replay(tmp_path)
    episode = make_episode(3, image=False)
    replay.add_step({key: value[0] for key, value in episode.items()})
    replay.add_step({key: value[1] for key, value in episode.items()})
    for t in range(3):  # a new episode starts before the old one ended
        replay.add_step({key: value[t] for key, value in episode.items()})
    assert replay.num_episodes == 1 and replay.num_steps == 2


def test_capacity_evicts_oldest_but_keeps_files(tmp_path):
    replay = Replay(tmp_path, capacity=25)
    for marker in range(3):
        replay.add_episode(make_episode(10, float(marker)))
    assert (replay.num_steps, replay.num_episodes) == (18, 2)  # 27 transitions held would pass 25
    assert (replay.total_steps, replay.total_episodes) == (27, 3)
    assert [episode["vector"][0, 0] for episode in replay.episodes()] == [1.0, 2.0]
    assert len(list(tmp_path.glob("*.npz"))) == 3
    markers = {replay.sample_window()["vector"][0, 0] for _ in range(50)}
    assert markers == {1.0, 2.0}
    # Reloading with a capacity keeps the newest episodes.
    reloaded = Replay(tmp_path, capacity=15)
    assert [episode["vector"][0, 0] for episode in reloaded.episodes()] == [2.0]


def test_stream_chunks_cut_windows_and_continue_where_the_last_chunk_ended(tmp_path):
    replay = Replay(tmp_path, seed=1, maxlen=4)
    for marker in range(3):
        replay.add_episode(make_episode(6, float(marker)))
    stream = replay.chunks(7)
    chunks = [next(stream) for _ in range(30)]
    for chunk in chunks:
        assert all(value.shape[0] == 7 for value in chunk.values()) and "log_score" not in chunk
        # Inside a window the step index grows by one; a new window starts exactly where is_first is set.
        step = chunk["vector"][:, 1]
        np.testing.assert_array_equal(chunk["is_first"][1:], np.diff(step) != 1)
    for before, after in zip(chunks, chunks[1:], strict=False):  # a chunk without is_first continues the previous one
        if not after["is_first"][0]:
            assert after["vector"][0, 1] == before["vector"][-1, 1] + 1
            assert after["vector"][0, 0] == before["vector"][-1, 0]
    mid_window = np.mean([not chunk["is_first"][0] for chunk in chunks])
    assert 0.3 < mid_window < 1  # windows of 4 cut into chunks of 7: most chunks start inside one
    fresh = replay.chunks(7, "fresh")
    assert all(next(fresh)["is_first"][0] for _ in range(30))
    with pytest.raises(ValueError, match="chunks must be one of stream, shared, fresh"):
        next(replay.chunks(7, "fixed"))


def test_episodes_shorter_than_minlen_stay_on_disk_but_are_not_sampled(tmp_path):
    replay = Replay(tmp_path, minlen=5)
    with pytest.warns(RuntimeWarning, match="fewer than minlen=5 transitions are kept"):
        path = replay.add_episode(make_episode(5, 1.0))  # 4 transitions
    assert path.exists() and replay.short_episodes == 1 and replay.num_episodes == 0
    with pytest.raises(ValueError, match="at least 5 transitions"):
        replay.sample_window()
    replay.add_episode(make_episode(6, 2.0))  # 5 transitions: held
    assert {replay.sample_window()["vector"][0, 0] for _ in range(30)} == {2.0}
    with pytest.warns(RuntimeWarning, match="not sampled"):
        reloaded = Replay(tmp_path, minlen=5)
    assert (reloaded.num_episodes, reloaded.short_episodes) == (1, 1)
    assert sorted(reloaded.file_lengths().values()) == [5, 6]  # both still count for the resumed step


def test_windows_are_capped_by_maxlen_and_shortened_by_up_to_minlen_minus_one(tmp_path):
    replay = Replay(tmp_path, maxlen=4)
    replay.add_episode(make_episode(50))
    assert all(replay.sample_window()["reward"].shape == (4,) for _ in range(20))
    shortened = Replay(tmp_path, minlen=3, maxlen=8, seed=0)
    lengths = collections.Counter(len(shortened.sample_window()["reward"]) for _ in range(3000))
    assert set(lengths) == {6, 7, 8} and min(lengths.values()) > 850  # 8 minus a uniform draw from {0, 1, 2}


def test_ongoing_episodes_are_sampled_once_long_enough(tmp_path):
    episode = make_episode(20, 3.0, image=False)
    for ongoing, expected in ((False, set()), (True, {3.0})):
        replay = Replay(tmp_path / str(ongoing), minlen=5, maxlen=5, ongoing=ongoing)
        replay.add_episode(make_episode(8, 1.0, image=False))
        for t in range(4):
            replay.add_step({key: value[t] for key, value in episode.items()})
        assert {replay.sample_window()["vector"][0, 0] for _ in range(40)} == {1.0}  # 3 transitions: too short
        for t in range(4, 10):
            replay.add_step({key: value[t] for key, value in episode.items()})
        markers = {replay.sample_window()["vector"][0, 0] for _ in range(60)}
        assert markers - {1.0} == expected


def test_prioritize_ends_gives_the_last_start_minlen_extra_draws(tmp_path):
    def last_step_rate(prioritize, minlen):
        replay = Replay(tmp_path / f"{prioritize}{minlen}", minlen=minlen, maxlen=10, prioritize_ends=prioritize,
                        seed=0)
        replay.add_episode(make_episode(100, image=False))
        windows = [replay.sample_window() for _ in range(4000)]
        return np.mean([window["is_last"][-1] for window in windows if len(window["reward"]) == 10])

    assert last_step_rate(False, 10) < 0.025  # 1 of 91 starts
    assert 0.09 < last_step_rate(True, 10) < 0.13  # 11 of 101 draws: min(U{0..100}, 90)
    assert 0.01 < last_step_rate(True, 1) < 0.035  # 2 of 92 draws


@pytest.mark.parametrize("sample, expected", [("episode", 0.5), ("step", 0.9)])
def test_episode_choice_is_uniform_or_in_proportion_to_length(tmp_path, sample, expected):
    replay = Replay(tmp_path, seed=0, sample=sample)
    replay.add_episode(make_episode(90, 1.0, image=False))
    replay.add_episode(make_episode(10, 2.0, image=False))
    long_rate = np.mean([replay.sample_window()["vector"][0, 0] == 1.0 for _ in range(4000)])
    # Standard errors over 4000 draws are 0.008 (p 0.5) and 0.005 (p 0.9): a swapped rule lands 0.4 away.
    assert abs(long_rate - expected) < 0.03, long_rate


def test_episode_sampling_is_the_default_and_other_modes_are_refused(tmp_path):
    assert Replay(tmp_path).sample == "episode"
    with pytest.raises(ValueError, match="sample must be one of episode, step, got 'uniform'"):
        Replay(tmp_path, sample="uniform")


def test_corrupt_and_foreign_files_are_skipped_with_warning(tmp_path):
    good = make_episode(6, 1.0)
    save_episode(tmp_path, good)
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    np.savez(tmp_path / "missing.npz", vector=good["vector"])
    broken = dict(good, reward=good["reward"][:3])
    np.savez(tmp_path / "lengths.npz", **broken)
    other = make_episode(6, 2.0, actions=5)  # different action size than the newest file
    np.savez(tmp_path / "00-other.npz", **other)
    with pytest.warns(RuntimeWarning) as caught:
        replay = Replay(tmp_path)
    messages = " ".join(str(item.message) for item in caught)
    for name in ("garbage.npz", "missing.npz", "lengths.npz", "00-other.npz"):
        assert name in messages
    assert replay.num_episodes == 1 and replay.stats()["replay_skipped_files"] == 4
    assert next(replay.chunks(3))["reward"].shape == (3,)


def test_foreign_directory_loads_for_offline_training(tmp_path):
    # Episodes written by another tool: plain np.savez, own names, float64 and int flags.
    for index in range(3):
        episode = make_episode(20, float(index), image=False)
        episode["vector"] = episode["vector"].astype(np.float64)
        episode["is_first"] = episode["is_first"].astype(np.int64)
        np.savez(tmp_path / f"episode_{index:04d}.npz", **episode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replay = Replay(tmp_path, capacity=0)
    assert replay.num_episodes == 3 and replay.num_steps == 57
    sequence = next(replay.chunks(8))
    assert sequence["vector"].dtype == np.float32 and sequence["is_first"].dtype == bool


def test_failed_write_leaves_no_episode_file(tmp_path, monkeypatch):
    replay = Replay(tmp_path)

    def crash(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", crash)
    with pytest.raises(KeyboardInterrupt):
        replay.add_episode(make_episode(5))
    assert list(tmp_path.iterdir()) == []
    assert replay.num_episodes == 0


def test_killed_writer_leaves_only_a_temp_file(tmp_path):
    # A separate process writes a large episode and is killed mid-write.
    script = textwrap.dedent(f"""
        import numpy as np
        from dreamerv2_tf.loop.episodes import save_episode
        rng = np.random.default_rng(0)
        n = 4000
        episode = {{"image": rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8),
                   "action": np.zeros((n, 3), np.float32), "reward": np.zeros(n, np.float32),
                   "is_first": np.zeros(n, bool), "is_last": np.zeros(n, bool),
                   "is_terminal": np.zeros(n, bool)}}
        print("writing", flush=True)
        save_episode({str(tmp_path)!r}, episode)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    deadline = time.time() + 20
    while not list(tmp_path.glob("*.tmp")) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    assert list(tmp_path.glob("*.tmp")), "the writer should have been killed during the write"
    assert not list(tmp_path.glob("*.npz"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the temp file is not even looked at
        assert Replay(tmp_path).num_episodes == 0


def test_dataset_shapes_and_dtypes(tmp_path):
    replay = Replay(tmp_path, seed=0)
    for marker in range(3):
        replay.add_episode(make_episode(9, float(marker)))
    batch = next(iter(replay.dataset(batch=3, length=7)))
    expected = {
        "image": ((3, 7, 8, 8, 1), "uint8"), "vector": ((3, 7, 2), "float32"),
        "action": ((3, 7, 3), "float32"), "reward": ((3, 7), "float32"),
        "is_first": ((3, 7), "bool"), "is_last": ((3, 7), "bool"), "is_terminal": ((3, 7), "bool"),
    }
    assert {key: (tuple(value.shape), value.dtype.name) for key, value in batch.items()} == expected
    assert batch["is_first"].numpy()[:, 0].all()


@pytest.mark.parametrize("chunks", ["stream", "shared"])
def test_which_row_a_sequence_inside_a_window_continues(tmp_path, chunks):
    """`stream`: row b continues row b of the previous batch, where the state carried into it was left.
    `shared` (the release's): the rows take consecutive sequences of one stream, so row b continues row
    b - 1 of the same batch, and row 0 the last row of the previous batch."""
    replay = Replay(tmp_path, seed=2, maxlen=5)
    for marker in range(4):
        replay.add_episode(make_episode(8, float(marker)))
    batches = list(itertools.islice(replay.dataset(3, 4, chunks, prefetch=False), 20))
    vectors = [row for batch in batches for row in batch["vector"].numpy()]  # (marker, step), in sampled order
    starts_inside = [not first for batch in batches for first in batch["is_first"].numpy()[:, 0]]
    previous = 3 if chunks == "stream" else 1
    inside = [i for i in range(previous, len(vectors)) if starts_inside[i]]
    assert len(inside) > 10  # windows of 5 cut into sequences of 4
    for i in inside:  # the same episode, one step on from where the previous sequence of its stream ended
        np.testing.assert_array_equal(vectors[i][0], vectors[i - previous][-1] + [0, 1])


def test_bad_arguments_and_episodes_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="capacity"):
        Replay(tmp_path, capacity=-1)
    with pytest.raises(ValueError, match="minlen"):
        Replay(tmp_path, minlen=0)
    replay = Replay(tmp_path)
    with pytest.raises(ValueError, match="collect data first"):
        replay.dataset(2, 5)
    with pytest.raises(ValueError, match="missing required keys"):
        replay.add_episode({"reward": np.zeros(3)})
    replay.add_episode(make_episode(4))
    with pytest.raises(ValueError, match="action"):
        replay.add_episode(make_episode(4, actions=5))
    assert len(list(tmp_path.glob("*.npz"))) == 1  # rejected episodes are not written
    assert load_episode(sorted(tmp_path.glob("*.npz"))[0])["reward"].shape == (4,)


def test_filename_length_reads_the_length_the_replay_writes_into_names():
    assert filename_length(episode_filename(137)) == 137
    assert filename_length(f"dir/{episode_filename(1)}") == 1
    for foreign in ("episode.npz", "run-final.npz", "20260101-abc-.npz", "run-1.5.npz", "junk-99999999.npz"):
        assert filename_length(foreign) is None, foreign


# ---- non-finite values and signatures ---------------------------------------------------------------------

# The spaces of an env producing `make_episode(..., image=False)` episodes with 3 actions.
SPACES = ({"vector": spaces.Box(-np.inf, np.inf, (2,), np.float32), "log_score": spaces.Box(0, 9, (), np.int64)},
          {"action": spaces.Discrete(3)})


def test_episodes_with_nan_or_inf_are_refused_at_add_and_skipped_at_load(tmp_path):
    replay = Replay(tmp_path)
    good = make_episode(6, 1.0)
    nan = make_episode(6, 2.0)
    nan["reward"][3] = np.nan
    inf = make_episode(6, 3.0)
    inf["vector"][2, 0] = np.inf
    assert replay.add_episode(good) is not None
    for episode, key in ((nan, "reward"), (inf, "vector")):
        with pytest.warns(RuntimeWarning, match=f"not stored.*non-finite values.*in {key}"):
            assert replay.add_episode(episode) is None
    assert replay.num_episodes == 1 and replay.refused_episodes == 2
    assert len(list(tmp_path.glob("*.npz"))) == 1  # refused episodes are not written
    np.savez(tmp_path / "zz-nan.npz", **nan)  # the same episodes written by another tool
    np.savez(tmp_path / "zz-inf.npz", **inf)
    log_nan = dict(make_episode(6, 4.0), log_score=np.full(6, np.nan))  # log_ keys are never trained on
    np.savez(tmp_path / "zz-log.npz", **log_nan)
    with pytest.warns(RuntimeWarning) as caught:
        reloaded = Replay(tmp_path)
    messages = [str(item.message) for item in caught]
    assert len(messages) == 2 and all("non-finite" in message for message in messages), messages
    assert any("zz-nan.npz" in m and "reward" in m for m in messages)
    assert any("zz-inf.npz" in m and "vector" in m for m in messages)
    assert sorted(episode["vector"][0, 0] for episode in reloaded.episodes()) == [1.0, 4.0]
    assert all(np.isfinite(reloaded.sample_window()["reward"]).all() for _ in range(50))


def test_random_bytes_are_reported_as_not_an_npz_file(tmp_path):
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(2000))
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")
    for name, expected in (("random.npz", "not an .npz archive"), ("array.npz", "single .npy array")):
        with pytest.raises(EpisodeError) as caught:
            load_episode(tmp_path / name)
        assert expected in str(caught.value) and name in str(caught.value)
        assert "pickle" not in str(caught.value)


def test_odd_file_sorting_newest_is_skipped_not_every_real_file(tmp_path):
    for marker in range(3):
        save_episode(tmp_path, make_episode(8, float(marker), image=False))
    odd = make_episode(8, 9.0, image=False)
    odd["vector"] = np.zeros((8, 5), np.float32)  # another shape; its name sorts after (newer than) the rest
    np.savez(tmp_path / "zzzz-odd.npz", **odd)
    for signature in (None, space_signature(*SPACES)):  # the majority of files, or the env's spaces
        with pytest.warns(RuntimeWarning) as caught:
            replay = Replay(tmp_path, signature=signature)
        messages = [str(item.message) for item in caught]
        assert len(messages) == 1 and "zzzz-odd.npz" in messages[0], messages
        assert "vector shape (5,) float32" in messages[0] and "vector shape (2,) float32" in messages[0]
        assert replay.num_episodes == 3 and replay.stats()["replay_skipped_files"] == 1
        lengths = replay.file_lengths()
        assert lengths["zzzz-odd.npz"] == 0 and sorted(lengths.values()) == [0, 8, 8, 8]
        assert next(replay.chunks(4))["vector"].shape == (4, 2)


def test_env_signature_refuses_an_added_episode_of_other_shapes(tmp_path):
    replay = Replay(tmp_path, signature=space_signature(*SPACES))
    with pytest.raises(EpisodeError, match="action size 5 where the environment's spaces have action size 3"):
        replay.add_episode(make_episode(4, actions=5, image=False))
    with pytest.raises(EpisodeError, match="extra key 'image'"):
        replay.add_episode(make_episode(4))
    assert replay.add_episode(make_episode(4, image=False)) is not None


def test_folder_of_another_action_size_is_one_error_naming_folder_and_sizes(tmp_path):
    for marker in range(4):
        np.savez(tmp_path / f"episode_{marker}.npz", **make_episode(5, float(marker), image=False, actions=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one error, not a warning per file first
        with pytest.raises(EpisodeError) as caught:
            Replay(tmp_path, signature=space_signature(*SPACES))
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path) in message and "4 of 4 files" in message
    assert "action size 5" in message and "action size 3" in message


def test_space_signature_matches_normalized_env_episodes():
    obs = {"image": spaces.Box(0, 255, (8, 8, 1), np.uint8), "pos": spaces.Box(-1, 1, (3,), np.float64),
           "reward": spaces.Box(-np.inf, np.inf, (), np.float32), "is_first": spaces.Box(0, 1, (), bool),
           "log_x": spaces.Box(0, 1, (), np.float32)}
    signature = space_signature(obs, {"action": spaces.Box(-1, 1, (2, 3), np.float32)})
    assert signature == {
        "image": ((8, 8, 1), np.uint8), "pos": ((3,), np.float32), "action": ((6,), np.float32),
        "reward": ((), np.float32), "is_first": ((), bool), "is_last": ((), bool), "is_terminal": ((), bool)}
