"""Open-loop predictions of a trained world model, as a PNG strip, a video and error numbers.

For each of `count` sequences of `length` steps sampled from a run's episodes, the world model observes
the first `context` frames through the posterior; from its last posterior state the prior then imagines
the remaining frames from the recorded actions alone (open loop), and the decoder renders them (paper
section 2.1 and Figure 2). The per-step mean squared error of the imagined frames is compared with a
naive baseline that repeats the last observed frame: a model that has learned the dynamics beats it, one
that only learned the static background does not. For Pong, a ball tracker (balltrack) also tells
whether the imagined ball is where the true one is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dreamerv2_tf import config as configlib
from dreamerv2_tf.loop.checkpoint import has_checkpoint
from dreamerv2_tf.loop.episodes import EpisodeError, filename_length, load_episode
from dreamerv2_tf.loop.logger import channels_to_rgb
from dreamerv2_tf.loop.rundir import train_episodes_dir
from dreamerv2_tf.tools import balltrack

VIDEO_SUFFIXES = (".gif", ".mp4")
PNG_SCALE = 2  # frames in the strip: 64x64 becomes 128x128
MIN_FRAME_PX = {"png": 128, "video": 96}  # smaller frames (MinAtar's 10x10) are enlarged to about this
GAP = 4  # pixels between cells of the strip; the context boundary line is drawn in one of them
SEQ_GAP = 12  # pixels between the row groups of two sequences
MARGINS = {"left": 84, "right": 8, "top": 44, "bottom": 40}  # room for labels around the frames
DPI = 100
VIDEO_BORDER = 4  # coloured frame around each video panel: green while observed, red while imagined
VIDEO_HEADER = 24
CONTEXT_COLOR = (0, 160, 0)
OPEN_LOOP_COLOR = (220, 0, 0)
TRUTH_COLOR = (128, 128, 128)
SHOW_MAX = 8  # sequences in the strip and the video unless --show says otherwise; more are unreadable
PREDICT_BATCH = 16  # sequences per forward pass: the decoder's activations for hundreds would not fit


@dataclass(frozen=True)
class Prediction:
    """Frames [N, T, H, W, C] as uint8 and the sampled sources (episode file name, start index)."""

    truth: np.ndarray
    model: np.ndarray
    context: int
    sources: tuple[tuple[str, int], ...]


# ---- data ------------------------------------------------------------------------------------------------


def sample_sequences(directory: str | Path, count: int, length: int,
                     seed: int) -> tuple[dict[str, np.ndarray], list[tuple[str, int]]]:
    """`count` windows of `length` steps, each inside one episode; the same seed gives the same windows.

    Episodes are drawn in proportion to their number of windows, so every window of the directory is
    equally likely; only the chosen files are read, which keeps this fast on replays of millions of steps.
    Returns (batch of arrays [count, length, ...] without log_ keys, [(file name, start), ...]).
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"episodes directory {directory} does not exist")
    files = sorted(directory.glob("*.npz"), key=lambda path: path.name)
    if not files:
        raise FileNotFoundError(f"no .npz episodes in {directory}")
    lengths = np.array([_file_length(path) for path in files])
    windows = np.maximum(lengths - length + 1, 0)
    if not windows.sum():
        raise ValueError(f"no episode in {directory} has {length} steps (longest: {lengths.max()}); "
                         "use a smaller --length")
    rng = np.random.default_rng(seed)
    eligible = int(np.count_nonzero(windows))
    # Distinct episodes while there are enough of them, so the sequences show different situations.
    picks = rng.choice(len(files), size=count, replace=count > eligible, p=windows / windows.sum())
    batch: dict[str, list[np.ndarray]] = {}
    sources = []
    for index in picks:
        path = files[int(index)]
        episode = load_episode(path)
        total = len(episode["reward"])
        if total < length:  # the file name promised more steps than the file holds
            raise EpisodeError(f"episode file {path} has {total} steps, its name says {lengths[index]}")
        start = int(rng.integers(0, total - length + 1))
        window = {key: value[start:start + length] for key, value in episode.items()
                  if not key.startswith("log_")}
        # A window may start mid-episode; the model then starts from its initial state, as in training.
        window["is_first"] = window["is_first"].copy()
        window["is_first"][0] = True
        if batch and set(window) != set(batch):
            raise EpisodeError(f"episode file {path} has keys {sorted(window)}, others {sorted(batch)}")
        for key, value in window.items():
            batch.setdefault(key, []).append(value)
        sources.append((path.name, start))
    return {key: np.stack(values) for key, values in batch.items()}, sources


def _file_length(path: Path) -> int:
    length = filename_length(path)
    if length is not None:
        return length
    try:  # not named by the replay: read it to learn its length
        return len(load_episode(path)["reward"])
    except EpisodeError:
        return 0


# ---- model -----------------------------------------------------------------------------------------------


def load_world_model(logdir: Path, config: configlib.Config,
                     data: Mapping[str, np.ndarray]) -> tuple[Any, str]:
    """The run's world model with the weights of its latest checkpoint; returns (model, checkpoint path).

    Only the world model is built, with shapes read from `data` (a batch [N, T, ...]), so this needs
    neither the environment nor the actor's action distribution.
    """
    import tensorflow as tf

    from dreamerv2_tf.algo.agent import model_obs_shapes, set_precision
    from dreamerv2_tf.algo.world_model import WorldModel
    from dreamerv2_tf.loop.checkpoint import DamagedCheckpoint, restore_weights

    # Predictions only: float32 on any device (the checkpointed variables are float32 in every precision).
    set_precision("32")
    obs_shapes = model_obs_shapes({key: value[0, 0] for key, value in data.items()})
    wm = WorldModel(obs_shapes, int(data["action"].shape[-1]), config)
    wm.build()
    holder = tf.Module(name="agent")  # the checkpoint stores the world model under agent/wm/
    holder.wm = wm
    # NaN until restored: any variable the checkpoint does not hold shows up below instead of predicting
    # from random initial weights.
    for variable in wm.variables_to_train:
        variable.assign(tf.fill(variable.shape, float("nan")))
    try:
        checkpoint = restore_weights(logdir / "checkpoints", holder)
    except DamagedCheckpoint:  # its message names the damaged files; this is not about other networks
        raise
    except (ValueError, tf.errors.OpError) as exc:
        # The half-restored checkpoint object would otherwise log every value it did not restore.
        tf.get_logger().setLevel("ERROR")
        raise ValueError(f"the checkpoint in {logdir / 'checkpoints'} does not fit the world model of the "
                         f"run's config.yaml (written by another version of dreamerv2_tf?): {exc}") from None
    missing = [v.name for v in wm.variables_to_train if np.isnan(v.numpy()).any()]
    if missing:
        raise ValueError(f"checkpoint {checkpoint} holds no (finite) values for {len(missing)} world-model "
                         f"variables, e.g. {missing[0]}; written by another version of dreamerv2_tf?")
    return wm, checkpoint


def predict(wm, data: Mapping[str, np.ndarray], key: str, context: int,
            seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(truth, model) frames [N, T, H, W, C] as uint8: reconstructions for the first `context` steps,
    open-loop predictions after them (WorldModel.video_pred), PREDICT_BATCH sequences at a time."""
    import keras

    keras.utils.set_random_seed(seed)  # the latent states are sampled
    height, batch = data[key].shape[2], PREDICT_BATCH
    # video_pred stacks truth, model and error along the height.
    model = np.concatenate([wm.video_pred({name: value[start:start + batch] for name, value in data.items()},
                                          key, context, count=batch).numpy()[:, :, height:2 * height]
                            for start in range(0, len(data[key]), batch)])
    return np.asarray(data[key], np.uint8), np.round(np.clip(model, 0, 1) * 255).astype(np.uint8)


def errors(truth: np.ndarray, model: np.ndarray, context: int) -> dict[str, Any]:
    """Mean squared errors (pixels in [0, 1]) of the model and of repeating the last observed frame."""
    truth = truth.astype(np.float64) / 255
    model = model.astype(np.float64) / 255
    per_step = ((model - truth) ** 2).mean(axis=(0, 2, 3, 4))
    copy = ((truth[:, context - 1:context] - truth[:, context:]) ** 2).mean(axis=(0, 2, 3, 4))
    short = lambda x: float(f"{x:.6g}")  # noqa: E731 - keeps the JSON line readable
    return {
        "steps": list(range(context, truth.shape[1])),
        "mse": [short(x) for x in per_step[context:]],
        "mse_mean": short(per_step[context:].mean()),
        "baseline_mse": [short(x) for x in copy],
        "baseline_mse_mean": short(copy.mean()),
        "recon_mse_mean": short(per_step[:context].mean()),
    }


# ---- pictures --------------------------------------------------------------------------------------------


def enlarged(scale: int, height: int, kind: str) -> int:
    """`scale`, or the larger one that makes frames of `height` pixels about MIN_FRAME_PX[kind] high."""
    return max(int(scale), -(-MIN_FRAME_PX[kind] // int(height)))


def _rgb(frames: np.ndarray, scale: int) -> np.ndarray:
    """[..., H, W, C] uint8 -> [..., H*scale, W*scale, 3] (nearest neighbour); other channel counts than 1
    and 3 (MinAtar's object channels) are drawn one colour per channel, as in the training videos."""
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, -1)
    elif frames.shape[-1] != 3:
        frames = channels_to_rgb(frames)
    return np.repeat(np.repeat(frames, scale, -3), scale, -2)


def _abs_error(truth: np.ndarray, model: np.ndarray) -> np.ndarray:
    return np.abs(truth.astype(np.int16) - model.astype(np.int16)).astype(np.uint8)


@dataclass(frozen=True)
class StripLayout:
    """Pixel geometry of the PNG strip: `rows` rows per sequence, one column every `every` frames."""

    count: int
    length: int
    every: int
    rows: int
    frame: tuple[int, int]  # height, width of one observation
    scale: int = PNG_SCALE

    @property
    def columns(self) -> list[int]:
        return list(range(0, self.length, self.every))

    @property
    def cell(self) -> tuple[int, int]:
        return self.frame[0] * self.scale, self.frame[1] * self.scale

    @property
    def content(self) -> tuple[int, int]:
        """Height and width of the frame area (without margins)."""
        height, width = self.cell
        cols = len(self.columns)
        group = self.rows * height + (self.rows - 1) * GAP
        return self.count * group + (self.count - 1) * SEQ_GAP, cols * width + (cols - 1) * GAP

    @property
    def size(self) -> tuple[int, int]:
        """Height and width of the whole PNG."""
        height, width = self.content
        return height + MARGINS["top"] + MARGINS["bottom"], width + MARGINS["left"] + MARGINS["right"]

    def origin(self, sequence: int, row: int, column: int, margins: bool = True) -> tuple[int, int]:
        """Top-left pixel (y, x) of a cell in the whole PNG (or, without margins, in the frame area)."""
        height, width = self.cell
        y = sequence * (self.rows * height + (self.rows - 1) * GAP + SEQ_GAP) + row * (height + GAP)
        x = column * (width + GAP)
        return (MARGINS["top"] + y, MARGINS["left"] + x) if margins else (y, x)


def write_strip(path: str | Path, prediction: Prediction, every: int, error_row: bool = False,
                title: str = "") -> StripLayout:
    """PNG: per sequence rows truth, model (and |error|), a column every `every` frames, the
    boundary between observed and imagined frames marked with a red line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    truth, model, context = prediction.truth, prediction.model, prediction.context
    rows = 3 if error_row else 2
    scale = enlarged(PNG_SCALE, truth.shape[2], "png")
    layout = StripLayout(len(truth), truth.shape[1], every, rows, truth.shape[2:4], scale)
    height, width = layout.size
    content = np.full((*layout.content, 3), 255, np.uint8)
    cell_h, cell_w = layout.cell
    panels = [truth, model] + ([_abs_error(truth, model)] if error_row else [])
    for seq in range(len(truth)):
        for row, frames in enumerate(panels):
            for col, t in enumerate(layout.columns):
                y, x = layout.origin(seq, row, col, margins=False)
                content[y:y + cell_h, x:x + cell_w] = _rgb(frames[seq, t], layout.scale)

    # One figure pixel per image pixel: figimage pastes the frames unresampled (below the boundary line),
    # and a transparent axes over the same area carries the labels in frame-area pixel coordinates.
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    fig.figimage(content, xo=MARGINS["left"], yo=MARGINS["bottom"], origin="upper", zorder=-1)
    content_h, content_w = layout.content
    ax = fig.add_axes((MARGINS["left"] / width, MARGINS["bottom"] / height,
                       content_w / width, content_h / height))
    ax.set_xlim(0, content_w)
    ax.set_ylim(content_h, 0)
    ax.set_facecolor("none")
    ax.spines[:].set_visible(False)
    xticks = [layout.origin(0, 0, c, margins=False)[1] + cell_w / 2 for c in range(len(layout.columns))]
    ax.set_xticks(xticks, [str(t) for t in layout.columns], fontsize=8)
    names = ["truth", "model", "|error|"][:rows]
    cells = [(s, r) for s in range(len(truth)) for r in range(rows)]
    yticks = [layout.origin(s, r, 0, margins=False)[0] + cell_h / 2 for s, r in cells]
    ax.set_yticks(yticks, [f"#{s + 1} {names[r]}" for s, r in cells], fontsize=8)
    ax.tick_params(length=0, pad=4)  # tick marks would overlap the edge pixels of the frames
    ax.set_xlabel("frame index", fontsize=9)
    # Column 0 (frame 0) is always observed; the line goes into the gap before the first imagined column.
    imagined = [c for c, t in enumerate(layout.columns) if t >= context]
    label = dict(fontsize=8, va="bottom", clip_on=False)
    ax.text(0, -4, "observed (context)", color="green", **label)
    if imagined:
        boundary = layout.origin(0, 0, imagined[0], margins=False)[1] - GAP / 2
        ax.axvline(boundary, color="red", linewidth=1.5)
        ax.text(boundary + GAP, -4, "imagined (open loop)", color="red", **label)
    if title:
        ax.set_title(title, fontsize=9, pad=16)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return layout


def video_frames(prediction: Prediction, scale: int = 3) -> np.ndarray:
    """[T, H, W, 3] uint8: one row per sequence with truth | model | |error|, a header with the step."""
    import cv2

    truth, model, context = prediction.truth, prediction.model, prediction.context
    count, length = truth.shape[:2]
    scale = enlarged(scale, truth.shape[2], "video")
    panel_h, panel_w = truth.shape[2] * scale + 2 * VIDEO_BORDER, truth.shape[3] * scale + 2 * VIDEO_BORDER
    height, width = VIDEO_HEADER + count * panel_h, 3 * panel_w
    height, width = height + height % 2, width + width % 2  # H.264 needs even sizes
    panels = [_rgb(truth, scale), _rgb(model, scale), _rgb(_abs_error(truth, model), scale)]
    frames = np.full((length, height, width, 3), 255, np.uint8)
    b = VIDEO_BORDER
    for t in range(length):
        frame = frames[t]
        color = CONTEXT_COLOR if t < context else OPEN_LOOP_COLOR
        for col, (name, panel) in enumerate(zip(("truth", "model", "|error|"), panels, strict=True)):
            x = col * panel_w
            for seq in range(count):
                y = VIDEO_HEADER + seq * panel_h
                frame[y:y + panel_h, x:x + panel_w] = TRUTH_COLOR if col == 0 else color
                frame[y + b:y + panel_h - b, x + b:x + panel_w - b] = panel[seq, t]
            label = f"{name} t={t}" if col == 0 else name
            cv2.putText(frame, label, (x + b, VIDEO_HEADER - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                        cv2.LINE_AA)
        state = "observed" if t < context else "open loop"
        size = cv2.getTextSize(state, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)[0][0]
        cv2.putText(frame, state, (2 * panel_w - b - size, VIDEO_HEADER - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    color, 1, cv2.LINE_AA)
    return frames


# ---- the tool --------------------------------------------------------------------------------------------


def openloop(logdir: str | Path, episodes: str | Path | None = None, context: int = 5, length: int = 50,
             count: int = 4, seed: int = 0, key: str = "image", png: str | Path | None = None,
             video: str | Path | None = None, every: int = 5, scale: int = 3, error_row: bool = False,
             show: int | None = None, track: str | None = None,
             track_out: str | Path | None = None) -> dict[str, Any]:
    """Open-loop predictions of the run in `logdir`; writes the PNG strip and the video (default: LOGDIR/
    openloop.png and .gif) of the first `show` sequences (default: `count`, at most SHOW_MAX) and returns the
    error numbers and file paths. `track="pong"` also scores the imagined ball in all `count` sequences
    (balltrack.write_report), returned under "track" and saved to `track_out` (LOGDIR/track_pong.json)."""
    logdir = Path(logdir).expanduser()
    config = _check_run(logdir)
    show = min(count, SHOW_MAX) if show is None else show
    for name, value in (("--context", context), ("--count", count), ("--every", every), ("--scale", scale),
                        ("--show", show)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if length <= context:
        raise ValueError(f"--length ({length}) must exceed --context ({context}) to leave steps to predict")
    png, video = Path(png) if png else logdir / "openloop.png", Path(video) if video else logdir / "openloop.gif"
    if png.suffix.lower() != ".png":
        raise ValueError(f"--png must end in .png, got {png}")
    if video.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"--video must end in {' or '.join(VIDEO_SUFFIXES)}, got {video}")
    directory = Path(episodes).expanduser() if episodes else train_episodes_dir(logdir, config)
    data, sources = sample_sequences(directory, count, length, seed)
    images = sorted(k for k, v in data.items() if v.ndim == 5)
    if key not in images:
        raise ValueError(f"--key '{key}' is not an image key of the episodes; choices: {', '.join(images) or 'none'}")
    if track:
        balltrack.check_run(track, config.task, data[key].shape[2:], key)

    # Imported after the checks above, so a wrong path fails without waiting for TensorFlow.
    wm, checkpoint = load_world_model(logdir, config, data)
    decoded = wm.heads["decoder"].cnn_keys
    if key not in decoded:
        raise ValueError(f"--key '{key}' is not an image key of the world model; choices: "
                         f"{', '.join(decoded) or 'none (the decoder renders no images)'}")
    truth, model = predict(wm, data, key, context, seed)
    result: dict[str, Any] = {
        "logdir": str(logdir), "checkpoint": checkpoint, "episodes": str(directory), "key": key,
        "seed": seed, "count": count, "length": length, "context": context, "png": str(png), "video": str(video),
        "sequences": [{"file": name, "start": start} for name, start in sources],
        **errors(truth, model, context),
    }
    if track:
        track_out = Path(track_out) if track_out else logdir / f"track_{track}.json"
        result.update(track=balltrack.write_report(track_out, truth, model, result), track_out=str(track_out))
    prediction = Prediction(truth[:show], model[:show], context, tuple(sources[:show]))
    for path in (png, video):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_strip(png, prediction, every, error_row,
                title=f"{key}: {context} observed frames, then imagined from the actions")
    from dreamerv2_tf.loop.evaluate import write_video

    write_video(video, video_frames(prediction, scale), fps=8)
    return result


def _check_run(logdir: Path) -> configlib.Config:
    """The run's config, once its logdir and checkpoint files are there (before TensorFlow loads)."""
    if not logdir.is_dir():
        raise FileNotFoundError(f"logdir {logdir} does not exist")
    config = configlib.load_run(logdir)
    if not has_checkpoint(logdir / "checkpoints"):
        raise FileNotFoundError(f"no checkpoint in {logdir / 'checkpoints'}; train the run until it saves")
    return config
