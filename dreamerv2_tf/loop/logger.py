"""Run output: metrics.jsonl, TensorBoard scalars and GIF videos, and the terminal line of each write.

The module is named `logger` rather than `logging` so it can never shadow the
standard library when the package directory ends up on `sys.path`.

Layout written into the run's logdir:

  metrics.jsonl                 one JSON object per `Logger.write()`: step, frames, time, scalars
  events.out.tfevents.*         TensorBoard scalars and videos (GIF image summaries)
  videos/<name>_<step>.gif      the newest few videos per name

TensorFlow is imported only when the first TensorBoard writer is created, so
scripts that just read metrics stay light.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dreamerv2_tf.loop.terminal import format_number, is_int, print_line

METRICS_FILE = "metrics.jsonl"
VIDEOS_DIR = "videos"

# Scalars shown in the terminal line, in this order: returns, the main losses, throughput.
TERMINAL_KEYS = (
    r".*return$",
    r".*model_loss$",
    r".*actor_loss$",
    r".*critic_loss$",
    r"^fps$",
    r"^updates_per_s$",
)
# Shown instead when no scalar matches TERMINAL_KEYS, so a write never prints an empty line.
TERMINAL_FALLBACK = 4


class Logger:
    """Collects scalars and videos between writes and sends them to every output at once.

    `step` is the agent step source: a callable returning it, or any counter
    that `int()` accepts (an int-like object or a tf.Variable). Frames are
    `step * action_repeat`. A scalar added several times between two writes is
    written as the mean of its values.
    """

    def __init__(
        self,
        logdir: str | Path,
        step: Callable[[], int] | Any,
        action_repeat: int = 1,
        tensorboard: bool = True,
        terminal: bool = True,
        video_fps: int = 20,
        videos_keep: int = 5,
        terminal_keys: tuple[str, ...] = TERMINAL_KEYS,
    ):
        if not callable(step):
            try:
                int(step)
            except (TypeError, ValueError):
                raise ValueError(
                    f"Logger step must be a callable returning the agent step or an int-like counter, "
                    f"got {type(step).__name__}"
                ) from None
        if not is_int(action_repeat) or action_repeat < 1:
            raise ValueError(f"Logger action_repeat must be an integer >= 1, got {action_repeat!r}")
        if not is_int(video_fps) or video_fps < 1:
            raise ValueError(f"Logger video_fps must be an integer >= 1, got {video_fps!r}")
        if not is_int(videos_keep) or videos_keep < 0:
            raise ValueError(f"Logger videos_keep must be an integer >= 0 (0 keeps all), got {videos_keep!r}")
        self.logdir = Path(logdir).expanduser()
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._step_source = step
        self.action_repeat = int(action_repeat)
        self.video_fps = int(video_fps)
        self.videos_keep = int(videos_keep)
        self._use_tensorboard = tensorboard
        self._use_terminal = terminal
        self._terminal_patterns = [re.compile(pattern) for pattern in terminal_keys]
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._videos: dict[str, np.ndarray] = {}
        self._writer = None
        self._closed = False
        self._checked_file_end = False
        # Baselines for rates; measured from construction so a resumed run starts at its own step.
        now = time.time()
        self._fps_last = (now, self.frames)
        self._updates_last: tuple[float, int] | None = None

    # Step and frame counters.

    @property
    def step(self) -> int:
        source = self._step_source
        return int(source() if callable(source) else source)

    @property
    def frames(self) -> int:
        return self.step * self.action_repeat

    # Collecting.

    def scalar(self, name: str, value: Any) -> None:
        """Adds a scalar; numbers, bools, numpy and TensorFlow scalars are accepted."""
        _check_name(name)
        number = _to_float(name, value)
        self._sums[name] = self._sums.get(name, 0.0) + number
        self._counts[name] = self._counts.get(name, 0) + 1

    def video(self, name: str, frames: Any) -> None:
        """Adds a video: [T, H, W, C] or [B, T, H, W, C] (tiled side by side), uint8 or float in [0, 1]."""
        _check_name(name)
        self._videos[name] = _video_frames(name, frames)

    def add(self, metrics: Mapping[str, Any], prefix: str | None = None) -> None:
        """Adds every entry: scalars (ndim 0 or size 1) and videos (ndim 4 or 5).

        With a prefix, 'loss' becomes '<prefix>_loss'.
        """
        if not isinstance(metrics, Mapping):
            raise ValueError(f"Logger.add expects a mapping of name to value, got {type(metrics).__name__}")
        for key, value in metrics.items():
            name = f"{prefix}_{key}" if prefix else str(key)
            array = _to_numpy(value)
            if array.ndim in (4, 5):
                self.video(name, array)
            elif array.size == 1 and array.ndim <= 1:
                self.scalar(name, array.reshape(()))
            else:
                raise ValueError(
                    f"metric '{name}' has shape {tuple(array.shape)}; expected a scalar, "
                    f"a video [T,H,W,C] or a batch of videos [B,T,H,W,C]"
                )

    def rates(self, updates: int) -> None:
        """Adds 'updates_per_s' from the total number of gradient updates done so far.

        The first call only sets the baseline, since the time of earlier updates is unknown.
        """
        if not is_int(updates) or updates < 0:
            raise ValueError(f"Logger.rates expects the total number of updates (int >= 0), got {updates!r}")
        now = time.time()
        if self._updates_last is not None:
            last_time, last_updates = self._updates_last
            if now > last_time and updates >= last_updates:
                self.scalar("updates_per_s", (updates - last_updates) / (now - last_time))
        self._updates_last = (now, int(updates))

    # Writing.

    def write(self, fps: bool = False) -> None:
        """Flushes everything collected since the last write to all outputs.

        With fps=True also adds 'fps' (environment frames per second since the
        previous fps measurement) and 'ram_mb' (resident memory of this process).
        A write with no scalars appends no JSON line.
        """
        if self._closed:
            raise ValueError("Logger.write called after close(); create a new Logger to keep logging")
        step, frames = self.step, self.frames
        if fps:
            self._add_resources(frames)
        scalars = {name: self._sums[name] / self._counts[name] for name in self._sums}
        videos = self._videos
        self._sums, self._counts, self._videos = {}, {}, {}
        if not scalars and not videos:
            return
        if scalars:
            self._write_jsonl(step, frames, scalars)
        # Encode each video once: the same GIF goes to its file and to TensorBoard.
        gifs = {name: (array.shape, encode_gif(array, self.video_fps)) for name, array in videos.items()}
        for name, (_, gif) in gifs.items():
            self._write_gif_file(name, step, gif)
        if self._use_tensorboard:
            self._write_tensorboard(step, scalars, gifs)
        if self._use_terminal and scalars:
            print_line(self.terminal_line(step, frames, scalars))

    def terminal_line(self, step: int, frames: int, scalars: Mapping[str, float]) -> str:
        """The line write() prints, e.g. '[1,000 | 4,000 frames] train_return 20 / fps 312'."""
        chosen: list[str] = []
        for pattern in self._terminal_patterns:
            chosen += sorted(k for k in scalars if pattern.match(k) and k not in chosen)
        if not chosen:
            chosen = list(scalars)[:TERMINAL_FALLBACK]
        parts = " / ".join(f"{key} {format_number(scalars[key])}" for key in chosen)
        return f"[{step:,} | {frames:,} frames] {parts}".rstrip()

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer; further writes raise."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # Internals.

    def _add_resources(self, frames: int) -> None:
        now = time.time()
        last_time, last_frames = self._fps_last
        if now > last_time and frames >= last_frames:
            self.scalar("fps", (frames - last_frames) / (now - last_time))
        self._fps_last = (now, frames)
        try:
            import psutil

            self.scalar("ram_mb", psutil.Process().memory_info().rss / 2**20)
        except (ImportError, OSError):  # Memory is a nice-to-have; never stop a run over it.
            pass

    def _write_jsonl(self, step: int, frames: int, scalars: Mapping[str, float]) -> None:
        record: dict[str, Any] = {"step": step, "frames": frames, "time": round(time.time(), 3)}
        for name, value in scalars.items():
            record[name] = value if math.isfinite(value) else None
        line = json.dumps(record, allow_nan=False)
        path = self.logdir / METRICS_FILE
        data = line.encode("utf-8") + b"\n"
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
            if not self._checked_file_end and size and os.pread(fd, 1, size - 1) != b"\n":
                # A crash can leave a partial last line; start on a fresh line so only that one is lost.
                data = b"\n" + data
            _write_all(fd, data, size, path)
            self._checked_file_end = True
        finally:
            os.close(fd)

    def _write_gif_file(self, name: str, step: int, gif: bytes) -> None:
        directory = self.logdir / VIDEOS_DIR
        directory.mkdir(exist_ok=True)
        safe = _safe_filename(name)
        _write_file_atomically(directory / f"{safe}_{step}.gif", gif)
        if self.videos_keep:
            pattern = re.compile(rf"^{re.escape(safe)}_(\d+)\.gif$")
            found = sorted(
                (int(match.group(1)), path)
                for path in directory.iterdir()
                if (match := pattern.match(path.name))
            )
            for _, path in found[: -self.videos_keep]:
                path.unlink(missing_ok=True)

    def _write_tensorboard(
        self, step: int, scalars: Mapping[str, float], gifs: Mapping[str, tuple[tuple[int, ...], bytes]]
    ) -> None:
        import tensorflow as tf

        try:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(str(self.logdir))
            with self._writer.as_default():
                for name, value in scalars.items():
                    tf.summary.scalar(name, value, step=step)
                for name, (shape, gif) in gifs.items():
                    height, width = shape[1:3]
                    # The image plugin's tensor layout: [width, height, encoded image...]; a GIF blob animates.
                    tensor = tf.constant([str(width).encode(), str(height).encode(), gif], dtype=tf.string)
                    tf.summary.write(name, tensor, step=step, metadata=_image_metadata(name))
            self._writer.flush()
        except tf.errors.OpError as exc:
            # A full or read-only disk: an OSError naming the events file, like every other write here.
            from dreamerv2_tf.loop.checkpoint import as_os_error

            found = re.search(r"[^\s;{}]*tfevents[^\s;]*", str(exc))
            raise as_os_error(exc, found.group(0) if found else self.logdir) from None


def read_metrics(path: str | Path, null_as_nan: bool = True) -> list[dict[str, Any]]:
    """Reads metrics.jsonl (or the one inside a logdir) into a list of dicts.

    Lines that are not valid JSON objects (a partial line left by a crash) are
    skipped with a warning naming the file and line number. Null values (NaN
    or inf when written) become float('nan') unless null_as_nan is False.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (expected a logdir or a {METRICS_FILE} file)")
    records = []
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                message = f"{path}:{number}: skipping a line that is not a complete JSON object"
                warnings.warn(message, stacklevel=2)
                continue
            if null_as_nan:
                record = {key: math.nan if value is None else value for key, value in record.items()}
            records.append(record)
    return records


def encode_gif(frames: np.ndarray, fps: int = 20) -> bytes:
    """Encodes [T, H, W, C] uint8 frames (C = 1 or 3) as a looping animated GIF."""
    import imageio.v3 as iio

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.dtype != np.uint8:
        raise ValueError(f"encode_gif expects uint8 frames [T,H,W,1|3], got {frames.dtype} {frames.shape}")
    if frames.shape[-1] == 1:
        frames = frames[..., 0]
    # GIF stores frame delays in 10 ms units; the Pillow backend takes milliseconds.
    return iio.imwrite("<bytes>", frames, extension=".gif", duration=round(1000 / fps), loop=0)


# Helpers.


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"metric names must be non-empty strings, got {name!r}")


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "numpy") and callable(value.numpy):  # TensorFlow tensors and variables.
        value = value.numpy()
    return np.asarray(value)


def _to_float(name: str, value: Any) -> float:
    array = _to_numpy(value)
    if (
        array.size != 1
        or array.ndim > 1
        or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_)
    ):
        raise ValueError(f"scalar '{name}' must be a single number, got {array.dtype} of shape {array.shape}")
    return float(array.reshape(()))


def _video_frames(name: str, frames: Any) -> np.ndarray:
    array = _to_numpy(frames)
    if array.ndim == 5:  # [B, T, H, W, C] -> [T, H, B * W, C]: the batch side by side.
        array = np.concatenate(list(array), axis=2)
    if array.ndim != 4 or min(array.shape) == 0:
        raise ValueError(
            f"video '{name}' has shape {tuple(np.shape(frames))}; expected [T,H,W,C] or [B,T,H,W,C]"
        )
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        array = (np.clip(np.nan_to_num(array), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        array = np.clip(array, 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"video '{name}' has dtype {array.dtype}; expected uint8 or float in [0, 1]")
    return array if array.shape[-1] in (1, 3) else channels_to_rgb(array)


def channels_to_rgb(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., C] frames of C object channels (MinAtar's) as RGB: each channel drawn in its own colour."""
    from matplotlib import colormaps

    colours = np.asarray(colormaps["tab10"](np.arange(frames.shape[-1]) % 10))[:, :3]
    return np.clip(frames.astype(np.float32) @ colours, 0, 255).astype(np.uint8)


def _safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "video"


def _write_all(fd: int, data: bytes, size: int, path: Path) -> None:
    """Append `data` to the file open as `fd` (of `size` bytes) completely or not at all.

    A disk that fills up mid-write would otherwise leave a cut line; the file is truncated back and
    the error raised with the file's path.
    """
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
    except OSError as exc:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def _write_file_atomically(path: Path, data: bytes) -> None:
    """Write a whole file under a temporary name, then rename it: never a half-written file."""
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def _image_metadata(name: str) -> bytes:
    from tensorboard.compat.proto import summary_pb2

    metadata = summary_pb2.SummaryMetadata(
        display_name=name,
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="images"),
    )
    return metadata.SerializeToString()
