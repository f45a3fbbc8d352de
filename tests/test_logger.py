"""Run output: metrics.jsonl, TensorBoard events, GIF videos, terminal lines and progress."""

import io
import json
import math
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest

from dreamerv2_tf.loop import logger as logger_module
from dreamerv2_tf.loop.logger import Logger, encode_gif, read_metrics
from dreamerv2_tf.loop.terminal import Progress


class Counter:
    """An int-like step counter, as the training loop keeps one."""

    def __init__(self, value=0):
        self.value = value

    def __int__(self):
        return self.value


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def time(self):
        return self.now


def strict_lines(path):
    """Parses every line, rejecting the non-standard NaN/Infinity tokens Python would accept."""

    def reject(token):
        raise ValueError(f"invalid JSON constant {token}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def distinct_frames(count, height=8, width=6, channels=3):
    # Pillow merges identical consecutive GIF frames, so every frame differs.
    frames = np.zeros((count, height, width, channels), np.uint8)
    for index in range(count):
        frames[index, index % height] = 40 + 20 * index
    return frames


def test_one_json_line_per_write_with_step_frames_time_and_scalars(tmp_path):
    step = Counter(10)
    log = Logger(tmp_path, step, action_repeat=4, tensorboard=False, terminal=False)
    log.add({"return": 3.5, "loss": np.float32(0.25)}, prefix="train")
    log.scalar("model_loss", 2.0)
    log.scalar("model_loss", 4.0)  # Repeated adds between writes are averaged.
    log.write()
    step.value = 20
    log.scalar("eval_return", np.int64(7))
    log.write()
    log.write()  # Nothing collected: no line.
    lines = strict_lines(tmp_path / "metrics.jsonl")
    assert len(lines) == 2
    first, second = lines
    assert (first["step"], first["frames"]) == (10, 40)
    assert first["train_return"] == 3.5 and first["train_loss"] == 0.25 and first["model_loss"] == 3.0
    assert abs(first["time"] - __import__("time").time()) < 60
    assert (second["step"], second["frames"], second["eval_return"]) == (20, 80, 7.0)
    assert "model_loss" not in second


def test_resumed_logger_appends_to_existing_metrics(tmp_path):
    for step in (100, 200):
        log = Logger(tmp_path, lambda step=step: step, tensorboard=False, terminal=False)
        log.scalar("train_return", float(step))
        log.write()
        log.close()
    assert [line["step"] for line in strict_lines(tmp_path / "metrics.jsonl")] == [100, 200]


def test_nan_and_inf_are_written_as_null(tmp_path):
    log = Logger(tmp_path, Counter(1), tensorboard=False, terminal=False)
    log.add({"a": float("nan"), "b": np.float32("inf"), "c": -math.inf, "d": 1.5})
    log.write()
    (line,) = strict_lines(tmp_path / "metrics.jsonl")
    assert line["a"] is None and line["b"] is None and line["c"] is None and line["d"] == 1.5
    (record,) = read_metrics(tmp_path)
    assert math.isnan(record["a"]) and record["d"] == 1.5
    (raw,) = read_metrics(tmp_path / "metrics.jsonl", null_as_nan=False)
    assert raw["a"] is None


def test_read_metrics_skips_truncated_last_line_with_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "frames": 4, "x": 1.0}\n{"step": 2, "frames": 8, "x": 2.0}\n{"step": 3, "fr')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:3"):
        records = read_metrics(path)
    assert [record["step"] for record in records] == [1, 2]
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path / "missing")


def test_resume_after_crash_starts_a_fresh_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "x": 1.0}\n{"step": 2, "x"')  # A crash mid-line.
    log = Logger(tmp_path, Counter(5), tensorboard=False, terminal=False)
    log.scalar("x", 5.0)
    log.write()
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:2"):
        records = read_metrics(path)
    assert [(record["step"], record["x"]) for record in records] == [(1, 1.0), (5, 5.0)]


def test_fps_updates_per_second_and_memory(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(logger_module, "time", clock)
    step = Counter(1000)
    log = Logger(tmp_path, step, action_repeat=4, tensorboard=False, terminal=False)
    log.rates(50)  # Baseline only.
    clock.now += 2.0
    step.value = 2000
    log.rates(250)
    log.write(fps=True)
    clock.now += 4.0
    step.value = 2500
    log.write(fps=True)
    first, second = strict_lines(tmp_path / "metrics.jsonl")
    assert first["fps"] == pytest.approx(4000 / 2.0)  # Counted from the step at construction (resume).
    assert first["updates_per_s"] == pytest.approx(100.0)
    assert second["fps"] == pytest.approx(2000 / 4.0)
    assert "updates_per_s" not in second
    assert 1 < first["ram_mb"] < 1e6


def test_terminal_line_shows_a_readable_selection(tmp_path, capsys):
    log = Logger(tmp_path, Counter(1_234_000), action_repeat=4, tensorboard=False)
    log.add({"train_return": 20.0, "model_loss": 5.1234, "model_kl": 1.0, "fps": 312.4, "image_loss": 2.0})
    log.write()
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["[1,234,000 | 4,936,000 frames] train_return 20 / model_loss 5.123 / fps 312.4"]
    quiet = Logger(tmp_path, Counter(1), tensorboard=False, terminal=False)
    quiet.scalar("train_return", 1.0)
    quiet.write()
    assert capsys.readouterr().out == ""


def test_terminal_line_falls_back_to_first_scalars(tmp_path):
    log = Logger(tmp_path, Counter(7), tensorboard=False, terminal=False)
    line = log.terminal_line(7, 7, {"alpha": 1.0, "beta": 12345.6, "gamma": float("nan")})
    assert line == "[7 | 7 frames] alpha 1 / beta 12,346 / gamma nan"


def test_gif_files_are_readable_tiled_and_bounded(tmp_path):
    step = Counter(0)
    log = Logger(tmp_path, step, tensorboard=False, terminal=False, videos_keep=2)
    batch = np.stack([distinct_frames(5), distinct_frames(5)[::-1]]).astype(np.float32) / 255.0
    for value in (10, 20, 30):
        step.value = value
        log.add({"policy": batch, "policy_gray": distinct_frames(4, channels=1)})
        log.write()
    names = sorted(path.name for path in (tmp_path / "videos").iterdir())
    assert names == ["policy_20.gif", "policy_30.gif", "policy_gray_20.gif", "policy_gray_30.gif"]
    frames = iio.imread(tmp_path / "videos" / "policy_30.gif", index=None)
    assert frames.shape[:3] == (5, 8, 12)  # Two videos of width 6 side by side.
    assert iio.imread(tmp_path / "videos" / "policy_gray_30.gif", index=None).shape[0] == 4
    assert not (tmp_path / "metrics.jsonl").exists()  # Videos alone add no JSON line.


def test_encode_gif_keeps_frames_and_timing():
    frames = distinct_frames(6)
    data = encode_gif(frames, fps=20)
    decoded = iio.imread(data, index=None, extension=".gif")
    assert decoded.shape == (6, 8, 6, 3)
    np.testing.assert_allclose(decoded.astype(int), frames.astype(int), atol=8)
    assert iio.immeta(data, extension=".gif")["duration"] == 50


def test_tensorboard_events_hold_scalars_and_gif_video(tmp_path):
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    step = Counter(3)
    with Logger(tmp_path, step, terminal=False) as log:
        log.add({"train_return": 21.0, "model_loss": float("nan"), "policy": distinct_frames(5)})
        log.write()
        step.value = 6
        log.scalar("train_return", -4.5)
        log.write()
    accumulator = event_accumulator.EventAccumulator(
        str(tmp_path), size_guidance={event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    events = accumulator.Tensors("train_return")
    returns = [(event.step, float(tf.make_ndarray(event.tensor_proto))) for event in events]
    assert returns == [(3, 21.0), (6, -4.5)]
    (loss,) = accumulator.Tensors("model_loss")
    assert math.isnan(float(tf.make_ndarray(loss.tensor_proto)))
    assert accumulator.SummaryMetadata("train_return").plugin_data.plugin_name == "scalars"
    assert accumulator.SummaryMetadata("policy").plugin_data.plugin_name == "images"
    (video,) = accumulator.Tensors("policy")
    width, height, gif = tf.make_ndarray(video.tensor_proto)
    assert (int(width), int(height), video.step) == (6, 8, 3)
    assert gif.startswith(b"GIF89a")
    assert iio.imread(gif, index=None, extension=".gif").shape[0] == 5


def test_object_channel_videos_are_drawn_in_one_colour_per_channel(tmp_path):
    log = Logger(tmp_path, Counter(0), tensorboard=False, terminal=False)
    frames = np.zeros((2, 10, 10, 4), np.uint8)
    frames[:, 3, 4, 1] = 255  # one object in channel 1
    frames[:, 9, 0, 3] = 255  # another in channel 3
    log.video("image", frames)
    rgb = log._videos["image"]
    assert rgb.shape == (2, 10, 10, 3) and rgb.dtype == np.uint8
    assert rgb[0, 3, 4].any() and rgb[0, 9, 0].any() and not rgb[0, 0, 0].any()
    assert not np.array_equal(rgb[0, 3, 4], rgb[0, 9, 0])  # different channels, different colours
    log.write()
    assert list((tmp_path / "videos").glob("image_*.gif"))
    log.close()


def test_bad_input_gives_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="action_repeat"):
        Logger(tmp_path, Counter(0), action_repeat=0)
    with pytest.raises(ValueError, match="step must be a callable"):
        Logger(tmp_path, "steps")
    log = Logger(tmp_path, Counter(0), tensorboard=False, terminal=False)
    with pytest.raises(ValueError, match="'losses' has shape \\(3,\\)"):
        log.add({"losses": np.zeros(3)})
    with pytest.raises(ValueError, match="'image' has shape \\(8, 8, 2\\); expected \\[T,H,W,C\\]"):
        log.video("image", np.zeros((8, 8, 2)))
    with pytest.raises(ValueError, match="scalar 'name' must be a single number"):
        log.scalar("name", "high")
    log.close()
    with pytest.raises(ValueError, match="after close"):
        log.write()


def test_import_and_logging_without_tensorboard_do_not_load_tensorflow(tmp_path):
    code = (
        "import sys\n"
        "from dreamerv2_tf.loop.logger import Logger, read_metrics\n"
        f"log = Logger({str(tmp_path)!r}, lambda: 1, tensorboard=False, terminal=False)\n"
        "log.scalar('x', 1.0); log.write(fps=True)\n"
        f"assert read_metrics({str(tmp_path)!r})[0]['x'] == 1.0\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob("events.out.tfevents*"))


def test_progress_prints_plain_lines_when_not_a_tty():
    out = io.StringIO()
    progress = Progress(total=1000, desc="prefill", initial=200, file=out)
    for _ in range(80):
        progress.update(10)
    progress.close()
    text = out.getvalue()
    lines = text.strip().splitlines()
    assert "\r" not in text
    assert len(lines) == 8  # 300, 400, ..., 1000: one line per 10%.
    assert lines[0].startswith("prefill:  30% 300/1,000 steps") and "ETA" in lines[0]
    assert lines[-1].startswith("prefill: 100% 1,000/1,000 steps") and "ETA" not in lines[-1]


def test_progress_update_to_and_final_line_on_close():
    out = io.StringIO()
    with Progress(total=100, desc="train", file=out, every=0.5) as progress:
        progress.update_to(30)
        progress.update_to(10)  # Never moves backwards.
        assert progress.n == 30
        assert out.getvalue() == ""
    assert out.getvalue().startswith("train:  30% 30/100 steps")
    silent = io.StringIO()
    with Progress(total=10, desc="x", file=silent, enabled=False) as progress:
        progress.update(10)
    assert silent.getvalue() == ""


def test_progress_uses_a_tqdm_bar_on_a_tty():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    with Progress(total=50, desc="train", file=out) as progress:
        progress.update(20)
        progress.update(5)
    text = out.getvalue()
    assert "\r" in text and "train:  50%" in text and "25/50" in text


def test_progress_past_its_total_caps_at_100_percent_and_stays_short():
    # A prefill of 100 steps that ends in a 4,235-step episode used to print a line per driver call.
    out = io.StringIO()
    progress = Progress(total=100, desc="prefill", file=out)
    for _ in range(42):
        progress.update(100)
    progress.update_to(4235)
    progress.close()
    lines = out.getvalue().strip().splitlines()
    assert len(lines) <= 11, lines
    percents = [int(line.split(":")[1].split("%")[0]) for line in lines]
    assert max(percents) == 100 and lines[-1].startswith("prefill: 100% 4,235/100 steps")


def test_progress_prints_at_most_about_ten_lines_for_many_small_updates():
    out = io.StringIO()
    with Progress(total=1000, desc="train", file=out) as progress:
        for _ in range(1500):
            progress.update(1)
    lines = out.getvalue().strip().splitlines()
    assert 10 <= len(lines) <= 11 and all("%" in line for line in lines)
    assert all(int(line.split(":")[1].split("%")[0]) <= 100 for line in lines)


def test_failed_metrics_write_leaves_only_whole_lines(tmp_path, monkeypatch):
    # The disk fills up in the middle of a line: the part already written is taken back.
    log = Logger(tmp_path, Counter(1), tensorboard=False, terminal=False)
    log.scalar("a", 1.0)
    log.write()
    real_write = logger_module.os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(logger_module.os, "write", half_then_full)
    log.scalar("a", 2.0)
    with pytest.raises(OSError) as error:
        log.write()
    assert error.value.errno == 28 and error.value.filename == str(tmp_path / "metrics.jsonl")
    assert [line["a"] for line in strict_lines(tmp_path / "metrics.jsonl")] == [1.0]
    monkeypatch.setattr(logger_module.os, "write", real_write)  # space again: logging continues
    log.scalar("a", 3.0)
    log.write()
    assert [line["a"] for line in strict_lines(tmp_path / "metrics.jsonl")] == [1.0, 3.0]


def test_metrics_on_a_really_full_disk_keep_whole_lines(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        log = Logger(mount, Counter(0), tensorboard=False, terminal=False)
        with pytest.raises(OSError) as error:
            for step in range(10**5):
                log._step_source.value = step
                log.add({f"loss_{index}": float(step) for index in range(20)})
                log.write()
        assert error.value.errno == 28 and str(mount) in error.value.filename
        lines = strict_lines(mount / "metrics.jsonl")
        assert len(lines) > 5 and [line["step"] for line in lines] == list(range(len(lines)))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
