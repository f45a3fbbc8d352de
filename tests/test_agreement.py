"""Curves of two implementations side by side (tools/agreement.py and `plot.py --table`) on synthetic runs."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from dreamerv2_tf.tools import agreement
from dreamerv2_tf.tools import scores as S

REPO = Path(__file__).resolve().parent.parent
TASK = "gym_CartPole-v1"
EVAL_STEPS = list(range(2500, 100_000, 5000))  # the schedule of `defaults vector` runs: 2,500 ... 97,500
SEED_OFFSETS = (-10.0, -5.0, 0.0, 5.0, 10.0)  # they average to 0: the seeds' mean is the true level


def load_plot():
    spec = importlib.util.spec_from_file_location("plot_script_agreement", REPO / "scripts" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot = load_plot()


def write_run(logdir: Path, seed: int, evals: dict[int, list[float]], train_only: bool = False) -> Path:
    """A logdir as the runs write it: a train line per evaluation step, then one eval line per episode."""
    logdir.mkdir(parents=True)
    (logdir / "config.yaml").write_text(f"seed: {seed}\ntask: {TASK}\naction_repeat: 1\n")
    lines = []
    for step, episodes in evals.items():
        lines.append({"step": step, "frames": step, "train_return": 1.0})
        if not train_only:
            lines += [{"step": step, "frames": step, "eval_return": value} for value in episodes]
    (logdir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return logdir


def rising(level: float, offset: float) -> dict[int, list[float]]:
    """Return rising to `level` by 50k steps, plus the seed's offset; 3 episodes spread evenly around it."""
    return {step: [level * min(1.0, step / 50_000) + offset + noise for noise in (-3.0, 0.0, 3.0)]
            for step in EVAL_STEPS}


def implementation(root: Path, level: float) -> Path:
    for seed, offset in enumerate(SEED_OFFSETS):
        write_run(root / f"seed{seed}", seed, rising(level, offset))
    return root


def run_plot(argv, capsys):
    code = plot.main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err.strip().splitlines()


def statement(text: str) -> tuple[float, float, float]:
    """(difference, low, high) from the printed agreement statement."""
    match = re.search(r"Difference \S+ − \S+: ([+-][\d.]+), 95% bootstrap interval \[([+-][\d.]+), ([+-][\d.]+)\]",
                      text)
    assert match, text
    return tuple(float(group) for group in match.groups())


def test_interval_holds_the_true_difference_and_excludes_zero_for_different_curves(tmp_path, capsys):
    release = implementation(tmp_path / "release", level=300.0)
    ours = implementation(tmp_path / "ours", level=100.0)
    out_png = tmp_path / "side_by_side.png"
    code, out, err = run_plot([f"release={release}", f"ours={ours}", "--xkey", "step", "--table",
                               "--out", str(out_png)], capsys)
    assert code == 0
    difference, low, high = statement(out)
    assert difference == -200.0  # the seed offsets cancel, so the means are the true levels
    assert low < -200.0 < high and high < 0
    assert "release 300.0 (5 seeds), ours 100.0 (5 seeds)" in out and "the interval excludes 0." in out
    # Window: the last 20% of 97,500 steps holds the evaluations at 82,500 ... 97,500.
    assert "are 78,000 to 97,500" in out
    assert err == [f"wrote {out_png} (1 tasks, 10 runs)"]


def test_interval_includes_zero_for_identical_curves(tmp_path, capsys):
    release = implementation(tmp_path / "release", level=200.0)
    ours = implementation(tmp_path / "ours", level=200.0)
    code, out, _ = run_plot([f"release={release}", f"ours={ours}", "--table", "--out", str(tmp_path / "a.png")],
                            capsys)
    assert code == 0
    difference, low, high = statement(out)
    assert difference == 0.0 and low < 0.0 < high
    assert "the interval includes 0." in out


def test_bootstrap_resamples_seeds_within_each_side():
    # Reference fixed; the other side's resampled mean is 0, 5 or 10 with chances 1/4, 1/2, 1/4.
    value, low, high = agreement.bootstrap_difference([0.0, 0.0, 0.0], [0.0, 10.0], resamples=10_000)
    assert (value, low, high) == (5.0, 0.0, 10.0)
    assert agreement.bootstrap_difference([0.0, 10.0], [0.0, 0.0, 0.0]) == (-5.0, -10.0, 0.0)
    assert agreement.bootstrap_difference([1.0, 4.0, 2.0], [3.0, 8.0]) == agreement.bootstrap_difference(
        [1.0, 4.0, 2.0], [3.0, 8.0])  # seeded: the printed interval does not move between calls
    _, low, high = agreement.bootstrap_difference([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0], resamples=20_000)
    assert low == pytest.approx(-high, abs=0.25) and low < 0 < high


def test_episodes_of_one_evaluation_are_averaged_before_best_final_and_bins(tmp_path, capsys):
    # Episode counts differ per step: weighting episodes would give other numbers than weighting evaluations.
    evals = {100: [0.0, 0.0, 0.0, 12.0], 200: [20.0], 300: [4.0, 6.0]}
    run = write_run(tmp_path / "ours" / "seed0", 0, evals)
    curve = S.per_evaluation(S.read_curve(run))
    np.testing.assert_array_equal(curve.step, [100, 200, 300])
    np.testing.assert_array_equal(curve.value, [3.0, 20.0, 5.0])
    summary = agreement.summarize_seed("ours", S.read_curve(run), (200.0, 300.0))
    assert (summary.best, summary.best_step, summary.final, summary.final_step) == (20.0, 200.0, 5.0, 300.0)
    assert summary.window_mean == 12.5  # evaluations at 200 and 300, each weighing one

    args = plot.parse_args([str(run), "--xkey", "step", "--bins", "0"])
    fig = plot.make_figure(args, plot.load_curves(args))
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), [3.0, 20.0, 5.0])
    args = plot.parse_args([str(run), "--xkey", "step", "--bins", "1"])
    _, mean, _ = plot.summarize(plot.load_curves(args)[(plot.DEFAULT_NAME, TASK)], "step", 1, "none")
    np.testing.assert_allclose(mean, [28.0 / 3])  # (3 + 20 + 5) / 3; by episodes it would be 42 / 7

    code, out, _ = run_plot([f"ours={run}", "--table", "--out", str(tmp_path / "b.png")], capsys)
    assert code == 0
    assert "| ours | 0 | 20.0 (200) | 5.0 (300) | 5.0 |" in out  # the last 20% of 300 steps hold only 300


def test_figure_has_a_mean_line_and_a_min_max_band_per_implementation(tmp_path):
    release = implementation(tmp_path / "release", level=300.0)
    ours = implementation(tmp_path / "ours", level=100.0)
    out = tmp_path / "figs" / "cmp.png"
    args = plot.parse_args([f"release={release}", f"ours={ours}", "--xkey", "step", "--out", str(out)])
    groups = plot.load_curves(args)
    fig = plot.make_figure(args, groups)
    ax = fig.axes[0]
    assert [line.get_color() for line in ax.lines] == ["C0", "C1"]
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), EVAL_STEPS)  # drawn at the evaluation steps
    np.testing.assert_allclose(ax.lines[0].get_ydata()[-1], 300.0)
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(rising(300.0, -10.0)[2500][1]) and band.max() == pytest.approx(310.0)
    assert plot.plot(args, groups) == out and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_implementation_folder_without_seeds_is_a_one_line_error(tmp_path, capsys):
    ours = implementation(tmp_path / "ours", level=100.0)
    (tmp_path / "release").mkdir()
    code, out, err = run_plot([f"release={tmp_path / 'release'}", f"ours={ours}", "--table",
                               "--out", str(tmp_path / "c.png")], capsys)
    assert code == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("error: no metrics.jsonl found in or below") and "release" in err[0]
    assert not (tmp_path / "c.png").exists()


def test_cut_lines_give_a_warning_and_keep_the_rest(tmp_path, capsys):
    release = implementation(tmp_path / "release", level=300.0)
    ours = implementation(tmp_path / "ours", level=100.0)
    metrics = ours / "seed2" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    cut = 40  # the train line of the 11th evaluation step (each step: a train line, 3 eval lines)
    assert "train_return" in lines[cut]
    lines[cut] = lines[cut][:17]  # killed mid-write, then resumed on a fresh line
    metrics.write_text("\n".join(lines) + "\n" + '{"step": 97500, "eval_re')
    code, out, err = run_plot([f"release={release}", f"ours={ours}", "--table", "--out", str(tmp_path / "d.png")],
                              capsys)
    assert code == 0
    warning = [line for line in err if line.startswith("warning:")]
    assert warning == [f"warning: {metrics}: skipped 2 of {len(lines) + 1} lines that are not complete JSON "
                       f"objects (line {cut + 1}, {len(lines) + 1})"]
    assert "| ours | 2 | 100.0 (52,500) | 100.0 (97,500) | 100.0 |" in out


def test_runs_without_eval_return_are_noted_and_left_out(tmp_path, capsys):
    release = implementation(tmp_path / "release", level=300.0)
    ours = implementation(tmp_path / "ours", level=100.0)
    write_run(ours / "seed5", 5, rising(100.0, 0.0), train_only=True)
    code, out, err = run_plot([f"release={release}", f"ours={ours}", "--table", "--out", str(tmp_path / "e.png")],
                              capsys)
    assert code == 0
    assert "note: skipped 1 runs without 'eval_return' values" in err
    assert "| ours | 5 |" not in out and "ours 100.0 (5 seeds)" in out

    # An implementation of runs without eval_return at all: a warning and no statement, not a crash.
    none = tmp_path / "none"
    write_run(none / "seed0", 0, rising(100.0, 0.0), train_only=True)
    code, out, err = run_plot([f"release={release}", f"none={none}", "--table", "--out", str(tmp_path / "f.png")],
                              capsys)
    assert code == 0 and "Difference" not in out
    assert "warning: gym_CartPole-v1: only 'release' has evaluations to compare; no difference" in err


def test_unequal_lengths_one_seed_and_repeated_seeds_are_warned(tmp_path, capsys):
    release = tmp_path / "release"
    write_run(release / "seed0", 0, rising(300.0, 0.0))
    ours = tmp_path / "ours"
    write_run(ours / "seed0", 0, {step: episodes for step, episodes in rising(100.0, 0.0).items() if step < 30_000})
    write_run(ours / "again" / "seed0", 0, {step: e for step, e in rising(100.0, 0.0).items() if step < 30_000})
    code, out, err = run_plot([f"release={release}", f"ours={ours}", "--table", "--out", str(tmp_path / "g.png")],
                              capsys)
    assert code == 0
    assert any(line.startswith("warning: gym_CartPole-v1: the runs' last evaluations are at 27,500 to 97,500 "
                               "steps; every run is judged on 22,000 to 27,500") for line in err)
    assert any("'ours' has seed 0 twice" in line for line in err)
    assert "no interval: the bootstrap needs at least 2 seeds of each." in out
    assert all(line.startswith(("warning: ", "note: ", "wrote ")) for line in err)


@pytest.mark.parametrize("argv, message", [
    (["--last-fraction", "0"], "--last-fraction must be in (0, 1], got 0"),
    (["--resamples", "10"], "--resamples must be >= 100, got 10"),
])
def test_table_options_are_checked(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        plot.main([str(tmp_path), "--table", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
