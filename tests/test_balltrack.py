"""Ball tracker for 64x64 grayscale Pong (dreamerv2_tf.tools.balltrack): real frames against the emulator's RAM,
the open-loop report on frames with known answers, and its refusal of a ball that is 3 pixels off.

The frames are recorded here from our env (atari_pong, seeded, random actions, a few hundred steps) with
ALE's RAM after every step. Pong keeps the ball's screen position in RAM[49] (x) and RAM[54] (y); the
affine map from them to the 64x64 frame (BALL_X0, BALL_Y0 below) was fitted by regressing the tracker's
positions on the RAM over 3,000 recorded frames, with slopes that come out as the resize factors
64/160 and 64/210 (test_ram_coordinates_map_affinely_onto_the_tracked_ball checks the fit again).
"""

from __future__ import annotations

import numpy as np
import pytest

from dreamerv2_tf.tools import balltrack as bt

STEPS = 700
RAM_X, RAM_Y = 49, 54  # Pong's ball x and y in its RAM; y is 0 while no ball is in play
SCALE_X, SCALE_Y = 64 / 160, 64 / 210  # the resize of the 160x210 screen to 64x64
BALL_X0, BALL_Y0 = 49.6, 14.0  # RAM value of frame column 0 and frame row 0 (fitted, see above)
BACKGROUND, BALL = 87, 236  # court and ball levels of the grayscale frames


def ram_position(ram: np.ndarray) -> np.ndarray:
    """[..., 2] (row, col) in the 64x64 frame of the ball in RAM [..., 128]."""
    x, y = ram[..., RAM_X].astype(float), ram[..., RAM_Y].astype(float)
    return np.stack([(y - BALL_Y0) * SCALE_Y, (x - BALL_X0) * SCALE_X], -1)


@pytest.fixture(scope="module")
def recorded() -> dict[str, np.ndarray]:
    """Frames [T, 64, 64, 1], the RAM after each step [T, 128], and which steps have the ball in play or
    surely none: a frame is the max over the step's last two emulator frames, so a ball that the RAM has
    just put out of play (y = 0) may still show; both the step and the one before must agree."""
    from dreamerv2_tf.envs import make_env

    env = make_env("atari_pong", seed=0, action_repeat=4)
    rng = np.random.default_rng(0)
    actions = np.eye(env.act_space["action"].n, dtype=np.float32)
    frames, rams = [env.reset()["image"]], [env.ale.getRAM().copy()]
    try:
        for _ in range(STEPS):
            obs = env.step({"action": actions[rng.integers(len(actions))]})
            if obs["is_last"]:
                obs = env.reset()
            frames.append(obs["image"])
            rams.append(env.ale.getRAM().copy())
    finally:
        env.close()
    ram = np.stack(rams)
    x, y = ram[:, RAM_X].astype(int), ram[:, RAM_Y].astype(int)
    before = np.concatenate([[0], y[:-1]])
    return {"frames": np.stack(frames), "ram": ram, "in_play": (x > 0) & (y > 0) & (before > 0),
            "absent": (y == 0) & (before == 0), "found": bt.ball_positions(np.stack(frames))}


def court(balls: list[tuple[int, int]] = ()) -> np.ndarray:
    """A synthetic 64x64x1 frame: the court's levels, walls, paddles, and one-pixel balls."""
    frame = np.full((64, 64), BACKGROUND, np.uint8)
    frame[7:11], frame[59:] = 236, 236
    frame[30:35, 6:8], frame[20:25, 56:58] = 148, 147
    for row, col in balls:
        frame[row, col] = BALL
    return frame[..., None]


def moved(frame: np.ndarray, ball: tuple[float, float], shift: tuple[int, int]) -> np.ndarray:
    """`frame` with the 5x5 patch around its ball moved by `shift` pixels (court background left behind)."""
    row, col = (int(round(x)) for x in ball)
    patch = frame[row - 2:row + 3, col - 2:col + 3].copy()
    out = frame.copy()
    out[row - 2:row + 3, col - 2:col + 3] = BACKGROUND
    out[row - 2 + shift[0]:row + 3 + shift[0], col - 2 + shift[1]:col + 3 + shift[1]] = patch
    return out


# ---- real frames against the RAM ---------------------------------------------------------------------


def test_recording_has_balls_in_play_and_frames_without_one(recorded):
    assert recorded["in_play"].sum() >= 300 and recorded["absent"].sum() >= 50


def test_ram_coordinates_map_affinely_onto_the_tracked_ball(recorded):
    found = recorded["found"]
    use = recorded["in_play"] & ~np.isnan(found[:, 0])
    for axis, index, scale, origin in ((1, RAM_X, SCALE_X, BALL_X0), (0, RAM_Y, SCALE_Y, BALL_Y0)):
        ram = recorded["ram"][use, index].astype(float)
        slope, intercept = np.polyfit(ram, found[use, axis], 1)
        assert slope == pytest.approx(scale, rel=0.02)  # RAM[49] is x, RAM[54] is y, in screen pixels
        assert -intercept / slope == pytest.approx(origin, abs=1.0)


def test_tracker_finds_the_ball_where_the_ram_has_it(recorded):
    found, in_play = recorded["found"], recorded["in_play"]
    missing = in_play & np.isnan(found[:, 0])
    assert missing.sum() <= 0.01 * in_play.sum()
    use = in_play & ~missing
    error = np.hypot(*(found[use] - ram_position(recorded["ram"][use])).T)
    assert error.max() <= 1.5 and error.mean() <= 0.4, (error.max(), error.mean())


def test_no_ball_when_none_is_in_play(recorded):
    # Paddles, half-hidden paddle stubs at the walls and the score are never taken for the ball.
    assert np.isnan(recorded["found"][recorded["absent"]]).all()


def test_decoded_looking_frames_blurred_dimmer_floats(recorded):
    """Frames as a decoder renders them: blurred, less contrast, a little noise, floats in [0, 1]."""
    import cv2

    rng = np.random.default_rng(1)
    frames = recorded["frames"][..., 0].astype(np.float32) / 255
    blurred = np.stack([cv2.GaussianBlur(frame, (0, 0), 0.7) for frame in frames])
    mean = blurred.mean(axis=(1, 2), keepdims=True)
    decoded = np.clip((blurred - mean) * 0.8 + mean + rng.normal(0, 3 / 255, blurred.shape), 0, 1)
    found = bt.ball_positions(decoded)
    clean = recorded["found"]
    has_ball = ~np.isnan(clean[:, 0])
    seen = has_ball & ~np.isnan(found[:, 0])
    assert seen.sum() >= 0.95 * has_ball.sum()
    assert np.hypot(*(found[seen] - clean[seen]).T).max() <= 1.0
    assert np.isnan(found[~has_ball]).all()


# ---- the report ----------------------------------------------------------------------------------------


def mid_court_frames(recorded, count: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Real frames whose ball is in the middle of the court (room to move it), and their ball centres."""
    found = recorded["found"]
    rows, cols = found[:, 0], found[:, 1]
    with np.errstate(invalid="ignore"):
        use = np.flatnonzero((rows > 16) & (rows < 53) & (cols > 13) & (cols < 50))
    assert len(use) >= count
    picks = use[np.linspace(0, len(use) - 1, count).astype(int)]
    return recorded["frames"][picks], found[picks]


@pytest.mark.parametrize("shift, hit", [((0, 3), 0.0), ((3, 0), 0.0), ((0, -3), 0.0), ((-3, 0), 0.0),
                                        ((2, 2), 0.0), ((0, 1), 1.0), ((-1, 0), 1.0), ((1, 1), 1.0),
                                        ((0, 2), 1.0), ((0, 0), 1.0)])
def test_a_ball_moved_by_3_pixels_is_a_miss_by_1_pixel_a_hit(recorded, shift, hit):
    frames, balls = mid_court_frames(recorded)
    predicted = np.stack([moved(frame, ball, shift) for frame, ball in zip(frames, balls, strict=True)])
    # The tracker follows the moved blob exactly, also as a decoder's float frame.
    np.testing.assert_allclose(bt.ball_positions(predicted), balls + shift, atol=1e-9)
    np.testing.assert_allclose(bt.ball_positions(predicted / 255.0), balls + shift, atol=1e-9)
    report = bt.track_report(frames[:, None], predicted[:, None], frames[:, None])
    assert report["n"] == [len(frames)] and report["hit"] == [hit]
    assert report["distance"] == [pytest.approx(np.hypot(*shift), abs=1e-3)]
    assert report["baseline_hit"] == [1.0] and report["baseline_distance"] == [0.0]


def test_track_report_known_answers():
    """2 sequences x 3 steps of one-pixel balls: the tracker returns the pixel, the numbers follow."""
    truth = [[court([(30, 20)]), court([(30, 21)]), court()],
             [court([(40, 30)]), court([(41, 30)]), court([(42, 30)])]]
    pred = [[court([(30, 20)]), court([(32, 22)]), court([(30, 22)])],  # hit, 2.24 px: a miss, no truth
            [court([(40, 33)]), court(), court([(43, 31)])]]  # 3 px: a miss, no ball: a miss, 1.41: a hit
    baseline = [[court([(30, 19)])] * 3, [court([(40, 29)])] * 3]
    report = bt.track_report(np.array(truth), np.array(pred), np.array(baseline))
    assert report["steps"] == [1, 2, 3] and report["n"] == [2, 2, 1] and report["tolerance"] == 2.0
    assert report["hit"] == [0.5, 0.0, 1.0]
    assert report["drawn"] == [1.0, 0.5, 1.0]  # the one predicted frame without a ball is at step 2
    assert report["distance"] == [1.5, pytest.approx(np.hypot(2, 1), abs=1e-3), pytest.approx(np.sqrt(2), abs=1e-3)]
    assert report["baseline_hit"] == [1.0, 1.0, 0.0]  # 2 px exactly is within the tolerance
    assert report["baseline_distance"] == [1.0, pytest.approx((2 + np.hypot(1, 1)) / 2, abs=1e-3),
                                           pytest.approx(np.hypot(2, 1), abs=1e-3)]
    # A wider tolerance turns the 2.24 and 3 px misses into hits; frames without a true ball never count.
    wide = bt.track_report(np.array(truth), np.array(pred), np.array(baseline), tolerance=3.0)
    assert wide["hit"] == [1.0, 0.5, 1.0]


def test_report_of_no_true_ball_is_none_and_the_table_shows_dashes():
    empty = np.array([[court()] * 2])
    report = bt.track_report(empty, empty, empty)
    assert report["n"] == [0, 0] and report["hit"] == [None, None] and report["distance"] == [None, None]
    assert report["drawn"] == [None, None]
    lines = bt.format_table(report).splitlines()
    assert len(lines) == 2 + 2 and lines[1].split()[:5] == ["k", "n", "hit", "drawn", "distance"]
    assert lines[2].split() == ["1", "0", "-", "-", "-", "-", "-"]


def test_openloop_report_repeats_the_last_observed_frame():
    # The ball moves one column per step: the copy of the last observed frame misses by k pixels at k.
    truth = np.array([[court([(30, 10 + t)]) for t in range(8)]])
    report = bt.openloop_report(truth, truth, context=3)
    assert report["steps"] == [1, 2, 3, 4, 5] and report["hit"] == [1.0] * 5 and report["distance"] == [0.0] * 5
    assert report["baseline_distance"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert report["baseline_hit"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert report["recon_hit"] == 1.0 and report["recon_drawn"] == 1.0


def test_openloop_report_scores_the_reconstructions_of_the_observed_frames():
    truth = np.array([[court([(30, 10 + t)]) for t in range(6)], [court([(40, 20 + t)]) for t in range(6)]])
    model = truth.copy()
    model[0, 0] = court()  # a reconstruction without the ball
    model[1, 1] = court([(40, 24)])  # one 3 px off
    report = bt.openloop_report(truth, model, context=3)
    assert report["recon_drawn"] == pytest.approx(5 / 6, abs=1e-3)
    assert report["recon_hit"] == pytest.approx(4 / 6, abs=1e-3)
    assert report["hit"] == [1.0, 1.0, 1.0]  # the imagined frames are untouched
    assert bt.format_table(report).splitlines()[-1] == "reconstructions of the observed frames: hit 0.667, drawn 0.833"


def test_frames_and_runs_the_tracker_cannot_read():
    with pytest.raises(ValueError, match="64x64 grayscale"):
        bt.find_ball(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="64x64 grayscale"):
        bt.ball_positions(np.zeros((2, 3, 48, 48, 1), np.uint8))
    bt.check_run("pong", "atari_pong", (64, 64, 1))
    with pytest.raises(ValueError, match="unknown --track 'tennis'; choices: pong"):
        bt.check_run("tennis", "atari_pong", (64, 64, 1))
    with pytest.raises(ValueError, match="needs a run on atari_pong, this run's task is atari_breakout"):
        bt.check_run("pong", "atari_breakout", (64, 64, 1))
    with pytest.raises(ValueError, match="64x64 grayscale frames .*--key 'image' has 64x64x3"):
        bt.check_run("pong", "atari_pong", (64, 64, 3))
