"""Learning-curve plots from run logdirs (scripts/plot.py)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dreamerv2_tf.tools import scores as S

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "plot.py"


def load_script():
    spec = importlib.util.spec_from_file_location("plot_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot = load_script()


def make_run(root: Path, task: str, seed: int, evals: list[tuple[int, float]], action_repeat: int = 4,
             frames: bool = True) -> Path:
    """A run logdir as train.py writes it: config.yaml and metrics.jsonl with train and eval lines."""
    logdir = root / task / f"seed{seed}"
    logdir.mkdir(parents=True)
    (logdir / "config.yaml").write_text(f"seed: {seed}\ntask: {task}\naction_repeat: {action_repeat}\n")
    lines = []
    for step, value in evals:
        base = {"step": step, "frames": step * action_repeat} if frames else {"step": step}
        lines.append({**base, "train_return": value - 1.0, "model_loss": 2.0})
        lines.append({**base, "eval_return": value})
    (logdir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return logdir


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for seed in range(3):
        evals = [(step, -21.0 + step / 1000 + seed) for step in range(0, 10001, 1000)]
        make_run(root, "atari_pong", seed, evals)
        make_run(root, "gym_CartPole-v1", seed, [(s, 10.0 + s / 100 + seed) for s in range(0, 5001, 500)],
                 action_repeat=1, frames=False)
    return root


def test_png_and_pdf_files_are_written(runs, tmp_path):
    png = tmp_path / "out" / "curves.png"
    assert plot.main([str(runs), "--out", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    pdf = tmp_path / "curves.pdf"
    assert plot.main([str(runs), "--out", str(pdf), "--spread", "std", "--xkey", "step"]) == 0
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2_000


def test_script_runs_from_the_command_line(runs, tmp_path):
    out = tmp_path / "cli.png"
    result = subprocess.run([sys.executable, str(SCRIPT), str(runs), "--out", str(out), "--bins", "5"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "2 tasks, 6 runs" in result.stdout
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_atari_panels_have_reference_lines_and_other_tasks_do_not(runs):
    args = plot.parse_args([str(runs), "--bins", "5"])
    fig = plot.make_figure(args, plot.load_curves(args))
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(axes) == {"Pong", "gym_CartPole-v1"}

    def horizontal(ax):
        return sorted(line.get_ydata()[0] for line in ax.lines if len(set(line.get_ydata())) == 1
                      and len(line.get_xdata()) == 2 and tuple(line.get_xdata()) == (0, 1))

    pong = S.load_table()["atari_pong"]
    assert horizontal(axes["Pong"]) == sorted([pong.rainbow, pong.iqn, pong.dreamerv2])
    assert horizontal(axes["gym_CartPole-v1"]) == []
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend == ["dreamerv2_tf", "DreamerV2 (paper)", "IQN (paper)", "Rainbow (paper)"]
    # No reference lines for a metric that is not a return, or when switched off.
    for extra in (["--metric", "model_loss"], ["--no-refs"]):
        args = plot.parse_args([str(runs), *extra])
        fig = plot.make_figure(args, plot.load_curves(args))
        pong_ax = next(ax for ax in fig.axes if ax.get_title() == "Pong")
        assert horizontal(pong_ax) == []


def test_x_axis_uses_frames_with_fallback_to_step_times_action_repeat(tmp_path):
    make_run(tmp_path, "atari_pong", 0, [(100, 1.0), (200, 2.0)], action_repeat=4, frames=False)
    args = plot.parse_args([str(tmp_path), "--bins", "0", "--no-refs"])
    fig = plot.make_figure(args, plot.load_curves(args))
    line = fig.axes[0].lines[0]
    np.testing.assert_array_equal(line.get_xdata(), [400, 800])
    assert fig.axes[0].get_xlabel() == "Frames"
    args = plot.parse_args([str(tmp_path), "--bins", "0", "--no-refs", "--xkey", "step"])
    fig = plot.make_figure(args, plot.load_curves(args))
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_xdata(), [100, 200])
    assert fig.axes[0].get_xlabel() == "Agent steps"


def test_binning_and_spread_over_seeds():
    edges = np.array([0.0, 10.0, 20.0, 30.0])
    binned = plot.bin_curve(np.array([0.0, 5.0, 10.0, 25.0]), np.array([1.0, 3.0, 5.0, 7.0]), edges)
    np.testing.assert_array_equal(binned[[0, 2]], [3.0, 7.0])
    assert np.isnan(binned[1])

    def curve(values):
        return S.Curve(path=Path("."), task="t", seed=0, metric="m", step=np.array([10.0, 20.0]),
                       frames=np.array([10.0, 20.0]), value=np.array(values, dtype=float))

    curves = [curve([0.0, 10.0]), curve([2.0, 20.0]), curve([4.0, 30.0])]
    centers, mean, band = plot.summarize(curves, "frames", 2, "minmax")
    np.testing.assert_allclose(centers, [10.0, 20.0])  # where the points are, not the bin centres
    np.testing.assert_allclose(mean, [2.0, 20.0])
    np.testing.assert_allclose(band, [[0.0, 10.0], [4.0, 30.0]])
    _, _, band = plot.summarize(curves, "frames", 2, "std")
    np.testing.assert_allclose(band[1] - mean, [np.std([0, 2, 4]), np.std([10, 20, 30])])
    assert plot.summarize(curves, "frames", 2, "none")[2] is None


def test_named_inputs_become_separate_methods(runs):
    args = plot.parse_args([f"a={runs / 'atari_pong'}", f"b={runs / 'atari_pong' / 'seed0'}", "--no-refs"])
    groups = plot.load_curves(args)
    assert {key: len(curves) for key, curves in groups.items()} == {("a", "atari_pong"): 3, ("b", "atari_pong"): 1}
    fig = plot.make_figure(args, groups)
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["a", "b"]


def test_ylim_sets_the_range_of_every_panel(runs):
    args = plot.parse_args([str(runs), "--ylim", "-5", "12.5"])
    fig = plot.make_figure(args, plot.load_curves(args))
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 2 and all(ax.get_ylim() == (-5.0, 12.5) for ax in panels)
    default = plot.parse_args([str(runs)])
    fig = plot.make_figure(default, plot.load_curves(default))
    assert all(ax.get_ylim() != (-5.0, 12.5) for ax in fig.axes if ax.get_title())


@pytest.mark.parametrize("argv, message", [
    (["--out", "x.jpg"], "--out must end in one of"),
    (["--bins", "-1"], "--bins must be >= 0"),
    (["--ylim", "5", "1"], "--ylim LOW must be below HIGH, got 5 1"),
    (["--metric", "eval_retrun"], "metric 'eval_retrun' appears in no metrics.jsonl"),
    (["--tasks", "atari_breakout"], "--tasks: no runs of atari_breakout"),
])
def test_user_mistakes_give_one_line_errors(runs, tmp_path, argv, message, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = plot.main([str(runs), *argv])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not list(tmp_path.glob("*.png"))
