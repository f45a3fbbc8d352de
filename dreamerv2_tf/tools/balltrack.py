"""A ball tracker for 64x64 grayscale Atari Pong frames, and an open-loop report built on it.

`find_ball` locates the ball in a frame as our Atari env renders it (ALE/Pong-v5 through gymnasium's
AtariPreprocessing: max over the last two emulator frames, grayscale, INTER_AREA resize to 64x64), and
in the world model's decoded predictions of such frames, which are blurry and dimmer. `track_report`
compares the ball of predicted frames with the ball of the true frames, step by step of an open-loop
prediction, beside the copy-the-last-frame baseline.

The geometry and the levels below were read off recorded frames of our env (seeded, random actions):
the ball is a 2x4-pixel sprite of the 160x210 screen, which the area resize turns into a blob of about
1x1.5 pixels, smeared to at most 3x3 pixels by the max over two frames.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

FRAME_SHAPE = (64, 64)
TRACKED_TASKS = {"pong": "atari_pong"}  # scripts/openloop.py --track NAME: the task it needs
TRACKERS = tuple(TRACKED_TASKS)
# Rows searched for the ball, [start, stop). In the 64x64 frames rows 0-6 hold the score, rows 7-10 the
# top wall (levels 189, 236, 236 and 141, the last one only partly covered by the wall) and rows 59-63 the
# bottom wall (218, then 236). A ball bouncing off the top wall brightens row 10, so that row is searched
# too; row 59 is kept for symmetry (a ball adds at most 18 levels to it, below MIN_EXCESS).
COURT_ROWS = (10, 60)
# Columns of the paddles, which move only vertically: the left (computer) paddle covers screen columns
# 16-19 and the right (agent) paddle 140-143 of 160, i.e. columns 6-7 and 56-57 after the resize
# (recorded frames: levels 124 | 148 and 147 | 123 over a court background of 87). Decoded frames blur a
# paddle into the next column on either side, so those are treated as paddle columns too.
PADDLE_COLUMNS = (5, 6, 7, 8, 55, 56, 57, 58)
# A vertical run of bright pixels in a paddle column is a paddle when it is this tall (a whole paddle is
# 16 of 210 screen rows, 5 rows here, and 4-9 rows once the max over two frames smears a moving one) or
# when it reaches into the first or last PADDLE_EDGE_ROWS searched rows (a paddle half hidden by a wall
# is a stub of 1-4 rows that starts in row 10 or 11, or ends in row 58, the partly covered wall rows
# being dim). The ball crossing a paddle column makes runs of 1-2 rows (recorded frames).
PADDLE_MIN_ROWS = 4
PADDLE_EDGE_ROWS = 2
# A run is made of the pixels this much over their row's background: lower than MIN_EXCESS, so that the
# whole of a dim, blurry paddle in a decoded frame is one tall run instead of a short core of a few rows.
PADDLE_RUN_EXCESS = 10.0
# How far a paddle rises over the court background (148 - 87 in the recorded frames). A stub at a wall
# is too short for a level of its own, so this much is taken off its pixels: what stays is a ball there
# (level 236, 149 over the background), not the paddle.
PADDLE_EXCESS = 62.0
# A pixel belongs to a blob when it is this much brighter than the background of its row (0-255 levels).
# In the recorded frames the brightest pixel of the ball is at least about 40 over the background (a ball
# split evenly over 2x2 pixels); 25 leaves room for the dimmer balls of decoded frames while staying above
# their blur and noise.
MIN_EXCESS = 25.0
# The largest blob taken for a ball, rows x columns: the recorded balls span at most 3x3 pixels, decoded
# ones a little more; anything larger is a paddle, a wall or a smear over the court.
MAX_BALL_SIZE = (4, 4)


def _levels(frame: Any) -> np.ndarray:
    """A [64, 64] float64 frame in 0-255 levels from uint8 levels or floats in [0, 1] (or 0-255)."""
    image = np.asarray(frame)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.shape != FRAME_SHAPE:
        raise ValueError(f"find_ball needs a 64x64 grayscale frame (or 64x64x1), got shape {image.shape}")
    image = image.astype(np.float64)
    # Decoded frames come as floats in [0, 1]; a float frame brighter than that is in 0-255 levels already.
    if np.issubdtype(np.asarray(frame).dtype, np.floating) and image.max(initial=0.0) <= 1.0:
        image = image * 255.0
    return image


def ball_excess(frame: Any) -> np.ndarray:
    """[len(range(*COURT_ROWS)), 64]: how much brighter than its row's background each pixel of the
    searched rows is, with paddles discounted. The background is the row's median: a row of 64 pixels
    holds at most 4 paddle and 3 ball pixels, and the median follows the palette (the first frame of a
    game is drawn lighter), the partly covered wall rows and the blur of decoded frames."""
    image = _levels(frame)
    rows = image[COURT_ROWS[0]:COURT_ROWS[1]]
    excess = np.clip(rows - np.median(rows, axis=1, keepdims=True), 0.0, None)
    for col in PADDLE_COLUMNS:
        _discount_paddles(excess[:, col])
    return excess


def _discount_paddles(column: np.ndarray) -> None:
    """Takes the paddle's level off each run of bright pixels in `column` (in place) that is a paddle
    (see PADDLE_MIN_ROWS), so that only a ball drawn over the paddle, brighter than it, stays bright.

    For a whole paddle the level is the run's median, which is the paddle's body even when the ball or
    the smear of a moving paddle adds a few rows, and which follows the dimmer paddles of decoded frames;
    for a stub at a wall it is PADDLE_EXCESS."""
    padded = np.concatenate([[False], column > PADDLE_RUN_EXCESS, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])  # run starts and stops, alternating
    for start, stop in zip(edges[::2], edges[1::2], strict=True):
        run = column[start:stop]
        if stop - start >= PADDLE_MIN_ROWS:
            run[:] = np.clip(run - np.median(run), 0.0, None)
        elif start < PADDLE_EDGE_ROWS or stop > len(column) - PADDLE_EDGE_ROWS:
            run[:] = np.clip(run - PADDLE_EXCESS, 0.0, None)


def find_ball(frame: Any) -> tuple[float, float] | None:
    """The ball's centre (row, col) in frame pixels, or None when the frame shows no ball.

    `frame` is [64, 64] or [64, 64, 1], uint8 levels or floats in [0, 1] (or in 0-255). The ball is the
    blob of bright pixels (8-connected, over MIN_EXCESS) that is small enough (MAX_BALL_SIZE); of several,
    the one with the largest summed brightness. The centre is the brightness-weighted mean over the blob's
    bounding box grown by one pixel, which takes in the dim edge pixels of a blurry ball; pixels of other
    blobs in that box are left out, so a paddle does not pull.
    """
    import cv2

    excess = ball_excess(frame)
    count, labels, stats, _ = cv2.connectedComponentsWithStats((excess > MIN_EXCESS).astype(np.uint8),
                                                               connectivity=8)
    sums = np.bincount(labels.ravel(), weights=excess.ravel(), minlength=count)
    small = (stats[:, cv2.CC_STAT_HEIGHT] <= MAX_BALL_SIZE[0]) & (stats[:, cv2.CC_STAT_WIDTH] <= MAX_BALL_SIZE[1])
    small[0] = False  # label 0 is the background
    if not small.any():
        return None
    best = int(np.argmax(np.where(small, sums, -1.0)))
    top, left = stats[best, cv2.CC_STAT_TOP], stats[best, cv2.CC_STAT_LEFT]
    box = (slice(max(top - 1, 0), top + stats[best, cv2.CC_STAT_HEIGHT] + 1),
           slice(max(left - 1, 0), left + stats[best, cv2.CC_STAT_WIDTH] + 1))
    weights = np.where(np.isin(labels[box], (0, best)), excess[box], 0.0)
    grid_rows, grid_cols = np.indices(weights.shape)
    total = weights.sum()
    row = (grid_rows * weights).sum() / total + box[0].start + COURT_ROWS[0]
    col = (grid_cols * weights).sum() / total + box[1].start
    return float(row), float(col)


def ball_positions(frames: Any) -> np.ndarray:
    """[..., 2] ball centres (row, col) of frames [..., 64, 64] or [..., 64, 64, 1]; NaN where none."""
    frames = np.asarray(frames)
    if frames.shape[-2:] != FRAME_SHAPE:  # a channel axis: [..., 64, 64, 1]
        frames = frames[..., 0] if frames.shape[-1] == 1 else frames
    if frames.shape[-2:] != FRAME_SHAPE:
        raise ValueError(f"ball tracking needs 64x64 grayscale frames, got frames of shape {frames.shape}")
    lead = frames.shape[:-2]
    found = [find_ball(frame) for frame in frames.reshape(-1, *FRAME_SHAPE)]
    positions = np.array([(np.nan, np.nan) if p is None else p for p in found], np.float64)
    return positions.reshape(*lead, 2)


def compare_positions(truth: np.ndarray, pred: np.ndarray, baseline: np.ndarray,
                      tolerance: float = 2.0) -> dict[str, Any]:
    """The report of `track_report` from ball centres [N, K, 2] (NaN where no ball was found)."""
    truth, pred, baseline = (np.asarray(x, np.float64) for x in (truth, pred, baseline))
    if not truth.shape == pred.shape == baseline.shape or truth.ndim != 3 or truth.shape[-1] != 2:
        raise ValueError(f"ball positions must all be [N, K, 2], got {truth.shape}, {pred.shape}, "
                         f"{baseline.shape}")
    present = ~np.isnan(truth[..., 0])
    counts = present.sum(axis=0)
    report: dict[str, Any] = {"tolerance": float(tolerance), "steps": list(range(1, truth.shape[1] + 1)),
                              "n": counts.tolist()}
    for prefix, positions in (("", pred), ("baseline_", baseline)):
        distance = np.hypot(*np.moveaxis(positions - truth, -1, 0))  # NaN unless both have a ball
        # No ball predicted is a miss; the slack keeps a distance of exactly `tolerance` (a blob moved by
        # whole pixels) a hit despite rounding in the centres.
        hits = (present & (distance <= tolerance + 1e-9)).sum(axis=0)
        both = ~np.isnan(distance)
        report[prefix + "hit"] = [_short(h / n) if n else None for h, n in zip(hits, counts, strict=True)]
        if not prefix:
            # Tells a miss for want of a ball from a ball drawn in the wrong place.
            drawn = (present & ~np.isnan(positions[..., 0])).sum(axis=0)
            report["drawn"] = [_short(d / n) if n else None for d, n in zip(drawn, counts, strict=True)]
        report[prefix + "distance"] = [_short(distance[both[:, k], k].mean()) if both[:, k].any() else None
                                       for k in range(truth.shape[1])]
    return report


def track_report(true_frames: Any, pred_frames: Any, baseline_frames: Any,
                 tolerance: float = 2.0) -> dict[str, Any]:
    """Ball-tracking scores of predicted frames against true ones, per step, beside a baseline.

    All three are frames [N, K, 64, 64(, 1)]: N sequences of K imagined steps. For each step k the report
    holds `n`, the number of frames whose true frame shows a ball; `hit`, the fraction of those whose predicted
    ball is within `tolerance` pixels (Euclidean) of the true one, a predicted frame without a ball being
    a miss; `drawn`, the fraction of those whose predicted frame shows a ball at all; `distance`, the
    mean distance in pixels over the frames where both show a ball; and hit and distance for the baseline
    frames (`baseline_hit`, `baseline_distance`). Fractions and distances are None
    where no frame counts. Lists run over k = 1..K (`steps`).
    """
    return compare_positions(ball_positions(true_frames), ball_positions(pred_frames),
                             ball_positions(baseline_frames), tolerance)


def openloop_report(truth: np.ndarray, model: np.ndarray, context: int,
                    tolerance: float = 2.0) -> dict[str, Any]:
    """`track_report` of an open-loop prediction, frames [N, T, 64, 64(, 1)] with `context` observed:
    the imagined frames against the true ones, beside repeating the last observed frame; and
    `recon_hit` and `recon_drawn` of the reconstructions of the observed frames, pooled over them."""
    true_positions = ball_positions(truth[:, context:])
    last = ball_positions(truth[:, context - 1])  # the baseline's frame is the same at every step
    baseline = np.broadcast_to(last[:, None], true_positions.shape)
    report = compare_positions(true_positions, ball_positions(model[:, context:]), baseline, tolerance)
    # The observed frames' reconstructions, pooled into one step: a ball they lose is lost by the
    # representation, not by the dynamics.
    observed = ball_positions(truth[:, :context]).reshape(-1, 1, 2)
    recon = compare_positions(observed, ball_positions(model[:, :context]).reshape(-1, 1, 2), observed, tolerance)
    report["recon_hit"], report["recon_drawn"] = recon["hit"][0], recon["drawn"][0]
    return report


def check_run(track: str, task: str, frame_shape: tuple[int, ...], key: str = "image") -> None:
    """ValueError (one line, for the command line) unless `track` is a tracker and fits the run: its
    task, and its frames of `frame_shape` under `key` (64x64x1 for Pong)."""
    if track not in TRACKERS:
        raise ValueError(f"unknown --track '{track}'; choices: {', '.join(TRACKERS)}")
    if task != TRACKED_TASKS[track]:
        raise ValueError(f"--track {track} needs a run on {TRACKED_TASKS[track]}, this run's task is {task}")
    if tuple(frame_shape) != (*FRAME_SHAPE, 1):
        shape = "x".join(str(n) for n in frame_shape)
        raise ValueError(f"--track {track} needs 64x64 grayscale frames (64x64x1); --key '{key}' has {shape} "
                         "(the run needs size [64, 64] and atari.grayscale true)")


def write_report(path: str | Path, truth: np.ndarray, model: np.ndarray,
                 about: Mapping[str, Any]) -> dict[str, Any]:
    """`openloop_report` of the open-loop frames truth and model [N, T, 64, 64, 1] with
    `about["context"]` observed, saved as JSON to `path` with the run's particulars from `about`
    (logdir, checkpoint, key, seed, count, context, where present); returns the saved report."""
    report = {name: about[name] for name in ("logdir", "checkpoint", "key", "seed", "count", "context")
              if name in about}
    report.update(openloop_report(truth, model, int(about["context"])))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One key a line, each list on its line: readable, and a diff shows which numbers changed.
    path.write_text("{\n" + ",\n".join(f" {json.dumps(name)}: {json.dumps(value)}" for name, value in report.items())
                    + "\n}\n")
    return report


def format_table(report: Mapping[str, Any]) -> str:
    """The per-step report as a text table, one line per imagined step k ('-' where nothing counts)."""
    names = ("k", "n", "hit", "drawn", "distance", "baseline hit", "baseline distance")
    widths = [max(len(name) + 2, 6) for name in names]
    lines = [f"hit: ball within {report['tolerance']:g} px of the true one; n: frames with a true ball; "
             "drawn: predicted frames showing a ball; distance: mean px where both show one; "
             "baseline: the last observed frame",
             "".join(f"{name:>{width}}" for name, width in zip(names, widths, strict=True))]
    columns = ("steps", "n", "hit", "drawn", "distance", "baseline_hit", "baseline_distance")
    for row in zip(*(report[name] for name in columns), strict=True):
        cells = [str(x) if i < 2 else "-" if x is None else f"{x:.3f}" for i, x in enumerate(row)]
        lines.append("".join(f"{cell:>{width}}" for cell, width in zip(cells, widths, strict=True)))
    if report.get("recon_hit") is not None:
        lines.append(f"reconstructions of the observed frames: hit {report['recon_hit']:.3f}, "
                     f"drawn {report['recon_drawn']:.3f}")
    return "\n".join(lines)


def _short(x: float) -> float:
    return float(f"{x:.4g}")  # keeps the JSON readable
