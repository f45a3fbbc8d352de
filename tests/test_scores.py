"""Table K1 data, the four Table 1 aggregates, run reading and the scores script."""

import contextlib
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dreamerv2_tf.tools import scores as S

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "scores.py"

# Paper Table 1 rows: gamer median, gamer mean, record mean, clipped record mean.
TABLE1 = {
    "dreamerv2": (2.15, 42.26, 0.44, 0.28),
    "iqn": (1.29, 11.27, 0.21, 0.21),
    "rainbow": (1.47, 9.95, 0.17, 0.17),
}


def make_run(root: Path, task: str, seed: int, evals: list[tuple[int, float]], action_repeat: int = 4,
             frames: bool = True) -> Path:
    """A run logdir as train.py writes it: config.yaml and metrics.jsonl with train and eval lines."""
    logdir = root / task / f"seed{seed}"
    logdir.mkdir(parents=True)
    (logdir / "config.yaml").write_text(
        f"logdir: {logdir}\nseed: {seed}\ntask: {task}\naction_repeat: {action_repeat}\n"
        "steps: 50000000\nrssm: {hidden: 600, deter: 600}\n"
    )
    lines = []
    for step, value in evals:
        base = {"step": step, "time": 12.5}
        if frames:
            base["frames"] = step * action_repeat
        lines.append({**base, "train_return": value - 3.0, "model_loss": 1.5, "fps": 120.0})
        lines.append({**base, "eval_return": value})
    (logdir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return logdir


spec = importlib.util.spec_from_file_location("scores_script", SCRIPT)
scores_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scores_script)


def run_script(*args: str) -> subprocess.CompletedProcess:
    """Run scripts/scores.py in this process (fast); output and exit status as from a subprocess."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = scores_script.main(list(args))
        except SystemExit as exc:
            code = exc.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def full_csv(path: Path, method_scores: dict[str, float], seed: int = 0, method: str = "") -> Path:
    rows = ["task,score,seed,method"] + [f"{task},{score},{seed},{method}" for task, score in method_scores.items()]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_table_has_55_games_with_snake_case_task_names():
    table = S.load_table()
    assert len(S.GAMES) == 55 == len(table)
    assert S.GAMES[0] == "atari_alien" and S.GAMES[-1] == "atari_zaxxon"
    for task in ("atari_james_bond", "atari_montezuma_revenge", "atari_pong", "atari_kung_fu_master",
                 "atari_up_n_down", "atari_ms_pacman", "atari_private_eye"):
        assert task in table
    assert all(task == task.lower() and " " not in task for task in S.GAMES)
    # Spot checks against Table K1, including negative and very large entries.
    pong = table["atari_pong"]
    assert (pong.random, pong.gamer, pong.record, pong.rainbow, pong.iqn, pong.dreamerv2) == (-21, 15, 21, 20, 20, 20)
    skiing = table["atari_skiing"]
    assert (skiing.random, skiing.gamer, skiing.record, skiing.rainbow) == (-17098, -4337, -3272, -28708)
    assert table["atari_video_pinball"].record == 89218328
    assert table["atari_up_n_down"].dreamerv2 == 653662
    assert S.game_name("atari_james_bond") == "James Bond"
    # Every game's baselines are ordered so the normalisations are well defined.
    assert all(row.random < row.gamer < row.record for row in table.values())


def test_table1_dreamerv2_row_is_reproduced_from_table_k1():
    result = S.aggregate(S.reference_scores("dreamerv2"))
    median, mean, record, clipped = TABLE1["dreamerv2"]
    assert round(result["gamer_median"], 2) == median
    assert result["gamer_mean"] == pytest.approx(mean, rel=0.005)
    assert round(result["record_mean"], 2) == record
    assert round(result["clipped_record_mean"], 2) == clipped


@pytest.mark.parametrize("method", ["iqn", "rainbow"])
def test_table1_baseline_rows_are_reproduced_from_table_k1(method):
    result = S.aggregate(S.reference_scores(method))
    median, mean, record, clipped = TABLE1[method]
    assert round(result["gamer_median"], 2) == median
    assert round(result["record_mean"], 2) == record
    assert round(result["clipped_record_mean"], 2) == clipped
    # Table K1 rounds the baselines to integers; Double Dunk's gamer - random gap shrinks from 2.2 to 3,
    # which lowers these gamer means by ~0.09 (see the next test).
    assert result["gamer_mean"] == pytest.approx(mean, rel=0.01)


def test_gamer_mean_gap_comes_from_double_dunk_rounding(monkeypatch):
    # Unrounded Double Dunk baselines (random -18.6, human -16.4; Mnih et al. 2015) close the gap.
    table = dict(S.load_table())
    table["atari_double_dunk"] = S.GameScores(**{**vars(table["atari_double_dunk"]), "random": -18.6,
                                                  "gamer": -16.4})
    monkeypatch.setattr(S, "load_table", lambda path=None: table)
    for method, (_, mean, _, _) in TABLE1.items():
        assert S.aggregate(S.reference_scores(method))["gamer_mean"] == pytest.approx(mean, rel=0.001)


def test_clipping_is_only_above_as_in_the_paper():
    # Rainbow scores below random on Skiing; clipping at 0 as well would give 0.19 instead of Table 1's 0.17.
    rainbow = S.reference_scores("rainbow")
    record = np.array([S.normalize(task, score, "record") for task, score in rainbow.items()])
    assert record.min() < 0
    assert round(float(np.clip(record, 0, 1).mean()), 2) != TABLE1["rainbow"][3]
    assert S.aggregate(rainbow)["clipped_record_mean"] == pytest.approx(np.minimum(record, 1).mean())
    assert S.aggregate({"atari_pong": 100.0})["clipped_record_mean"] == 1.0
    assert S.aggregate({"atari_pong": -31.0})["clipped_record_mean"] == pytest.approx(-10 / 42)


def test_normalize_uses_random_and_gamer_or_record():
    assert S.normalize("atari_pong", -21) == 0.0
    assert S.normalize("atari_pong", 15) == 1.0
    assert S.normalize("atari_pong", 21, "record") == 1.0
    assert S.normalize("atari_pong", 0, "record") == pytest.approx(21 / 42)
    with pytest.raises(ValueError, match="did you mean atari_pong"):
        S.normalize("atari_pongg", 0)


def test_per_seed_aggregation_differs_from_averaging_first():
    # Record-normalised: seed 0 beats the record twice on Pong, seed 1 is at random level.
    # Per seed the clip counts the first seed as 1, so the mean over seeds is 0.5; averaging the
    # scores first gives a mean at the record, clipped to 1.
    pong = S.load_table()["atari_pong"]
    high = pong.random + 2 * (pong.record - pong.random)
    per_seed = {0: {"atari_pong": high}, 1: {"atari_pong": pong.random}}
    assert S.aggregate_seeds(per_seed)["clipped_record_mean"] == pytest.approx(0.5)
    assert S.aggregate({"atari_pong": (high + pong.random) / 2})["clipped_record_mean"] == pytest.approx(1.0)
    # The median also depends on the order: three games, two seeds with opposite strengths.
    games = ["atari_pong", "atari_breakout", "atari_boxing"]
    gamer = {0: [0.0, 1.0, 10.0], 1: [10.0, 1.0, 0.0]}
    table = S.load_table()
    per_seed = {
        seed: {task: table[task].random + v * (table[task].gamer - table[task].random)
               for task, v in zip(games, values, strict=True)}
        for seed, values in gamer.items()
    }
    averaged = {task: (per_seed[0][task] + per_seed[1][task]) / 2 for task in games}
    assert S.aggregate_seeds(per_seed)["gamer_median"] == pytest.approx(1.0)
    assert S.aggregate(averaged)["gamer_median"] == pytest.approx(5.0)
    # The plain means are linear, so both orders agree there.
    assert S.aggregate_seeds(per_seed)["gamer_mean"] == pytest.approx(S.aggregate(averaged)["gamer_mean"])


def test_read_curve_and_final_score_from_logdir(tmp_path):
    logdir = make_run(tmp_path, "atari_pong", 3, [(0, -21.0), (250000, -10.0), (500000, 5.0), (750000, 9.0)])
    curve = S.read_curve(logdir)
    assert curve.task == "atari_pong" and curve.seed == 3
    np.testing.assert_array_equal(curve.step, [0, 250000, 500000, 750000])
    np.testing.assert_array_equal(curve.frames, [0, 1e6, 2e6, 3e6])
    np.testing.assert_array_equal(curve.value, [-21, -10, 5, 9])
    assert S.final_score(curve) == 9.0
    assert S.final_score(curve, last=2) == 7.0
    train = S.read_curve(logdir, "train_return")
    np.testing.assert_array_equal(train.value, [-24, -13, 2, 6])
    assert S.final_score(S.read_curve(logdir, "nothing")) is None


def test_frames_fall_back_to_step_times_action_repeat(tmp_path):
    logdir = make_run(tmp_path, "atari_pong", 0, [(100, 1.0), (200, 2.0)], action_repeat=4, frames=False)
    curve = S.read_curve(logdir)
    np.testing.assert_array_equal(curve.frames, [400, 800])


def test_evaluations_at_the_same_step_count_as_one(tmp_path):
    logdir = make_run(tmp_path, "atari_pong", 0, [(100, 1.0), (200, 2.0), (200, 4.0)])
    assert S.final_score(S.read_curve(logdir)) == 3.0
    assert S.final_score(S.read_curve(logdir), last=2) == 2.0


def test_cut_lines_are_skipped_with_a_warning_naming_them(tmp_path):
    logdir = make_run(tmp_path, "atari_pong", 0, [(100, 1.0), (200, 2.0)])
    with open(logdir / "metrics.jsonl", "a") as file:
        file.write('{"step": 300, "eval_ret')  # a run killed mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl: skipped 1 of 5 lines .*\(line 5\)"):
        assert S.final_score(S.read_curve(logdir)) == 2.0
    # Resumed, the run writes on after the cut line, which now stands in the middle.
    with open(logdir / "metrics.jsonl", "a") as file:
        file.write('\n{"step": 300, "eval_return": 6.0}\n')
    with pytest.warns(UserWarning, match=r"skipped 1 of 6 lines .*\(line 5\)"):
        curve = S.read_curve(logdir)
    np.testing.assert_array_equal(curve.value, [1.0, 2.0, 6.0])
    result = run_script(str(logdir), "--allow-partial", "--no-per-game")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"warning: {logdir / 'metrics.jsonl'}: skipped 1 of 6 lines that are not "
                                          f"complete JSON objects (line 5)"]


def test_find_logdirs_searches_recursively_and_explains_failures(tmp_path):
    a = make_run(tmp_path / "sweep", "atari_pong", 0, [(1, 1.0)])
    b = make_run(tmp_path / "sweep", "atari_breakout", 1, [(1, 1.0)])
    assert S.find_logdirs(tmp_path / "sweep") == sorted([a, b])
    assert S.find_logdirs(a) == [a]
    (tmp_path / "empty").mkdir()
    with pytest.raises(S.ScoreError, match="no metrics.jsonl"):
        S.find_logdirs(tmp_path / "empty")
    with pytest.raises(S.ScoreError, match="no such file or directory"):
        S.find_logdirs(tmp_path / "absent")
    (a / "config.yaml").unlink()
    with pytest.raises(S.ScoreError, match="no config.yaml"):
        S.read_curve(a)


def test_script_reference_only_prints_table1_rows():
    result = run_script()
    assert result.returncode == 0, result.stderr
    assert "| DreamerV2 (Table K1) | — | 55/55 | 2.15 | 42.18 | 0.44 | 0.28 |" in result.stdout
    assert "| Rainbow (Table K1) | — | 55/55 | 1.47 | 9.86 | 0.17 | 0.17 |" in result.stdout
    assert "| James Bond | 7 | 29 | 45550 | 1097 | 3166 | 40445 |" in result.stdout


def test_script_partial_logdirs_refused_without_flag_and_marked_with_it(tmp_path):
    make_run(tmp_path / "runs", "atari_pong", 0, [(0, -21.0), (1000, 3.0)])
    make_run(tmp_path / "runs", "atari_breakout", 0, [(0, 1.0), (1000, 16.0)])
    refused = run_script(str(tmp_path / "runs"))
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1
    assert refused.stderr.startswith("error: incomplete benchmark")
    assert "misses 53 of 55 games" in refused.stderr and "--allow-partial" in refused.stderr

    accepted = run_script(str(tmp_path / "runs"), "--allow-partial", "--json")
    assert accepted.returncode == 0, accepted.stderr
    out = json.loads(accepted.stdout)
    assert out["partial"] is True
    assert out["games"] == ["atari_breakout", "atari_pong"]
    ours = out["methods"]["dreamerv2_tf"]
    assert ours["games"]["atari_pong"]["mean"] == 3.0
    assert ours["games"]["atari_breakout"]["scores"] == {"0": 16.0}
    assert len(ours["missing"]["0"]) == 53
    expected = S.aggregate({"atari_pong": 3.0, "atari_breakout": 16.0})
    assert ours["aggregate"] == pytest.approx(expected)
    # Reference rows are restricted to the same two games.
    ref = S.aggregate({t: S.reference_scores("dreamerv2")[t] for t in ("atari_pong", "atari_breakout")})
    assert out["reference"]["DreamerV2"] == pytest.approx(ref)

    markdown = run_script(str(tmp_path / "runs"), "--allow-partial")
    assert markdown.returncode == 0
    assert "PARTIAL" in markdown.stdout and "dreamerv2_tf (partial)" in markdown.stdout
    assert "## Missing" in markdown.stdout


def test_script_full_csv_with_seeds_aggregates_per_seed(tmp_path):
    dreamer = S.reference_scores("dreamerv2")
    rows = ["task,score,seed"]
    for seed, factor in ((0, 0.5), (1, 1.5)):
        rows += [f"{task},{score * factor if score > 0 else score},{seed}" for task, score in dreamer.items()]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    result = run_script(f"mine={tmp_path / 'r.csv'}", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["partial"] is False
    mine = out["methods"]["mine"]
    assert mine["seeds"] == ["0", "1"]
    per_seed = [S.aggregate({t: v * f if v > 0 else v for t, v in dreamer.items()}) for f in (0.5, 1.5)]
    for metric in S.METRICS:
        assert mine["aggregate"][metric] == pytest.approx((per_seed[0][metric] + per_seed[1][metric]) / 2)
    # A complete input is not marked partial in Markdown either.
    text = run_script(str(tmp_path / "r.csv")).stdout
    assert "PARTIAL" not in text and "| dreamerv2_tf | 2 | 55/55 |" in text


def test_script_csv_method_column_gives_rows(tmp_path):
    rows = ["task,score,method"]
    for method in ("DreamerV2", "Rainbow"):
        rows += [f"{t},{v},{method}-copy" for t, v in S.reference_scores(method.lower()).items()]
    (tmp_path / "both.csv").write_text("\n".join(rows) + "\n")
    result = run_script(str(tmp_path / "both.csv"), "--no-per-game")
    assert result.returncode == 0, result.stderr
    assert "| DreamerV2-copy | 1 | 55/55 | 2.15 | 42.18 | 0.44 | 0.28 |" in result.stdout
    assert "| Rainbow-copy | 1 | 55/55 | 1.47 | 9.86 | 0.17 | 0.17 |" in result.stdout
    assert "## Per game" not in result.stdout


@pytest.mark.parametrize("content, message", [
    ("task,score\natari_pongg,3\n", "unknown task 'atari_pongg'.*did you mean atari_pong"),
    ("task,score\ngym_CartPole-v1,3\n", "unknown task 'gym_CartPole-v1'"),
    ("game,value\natari_pong,3\n", "needs a header with columns task,score"),
    ("task,score\natari_pong,abc\n", "score 'abc' is not a number"),
    ("task,score\natari_pong,1\natari_pong,2\n", "two scores for atari_pong seed 0"),
])
def test_script_bad_csv_gives_one_line_error(tmp_path, content, message):
    (tmp_path / "bad.csv").write_text(content)
    result = run_script(str(tmp_path / "bad.csv"), "--allow-partial")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(message, lines[0])


def test_script_unknown_task_in_logdir_and_unknown_metric(tmp_path):
    make_run(tmp_path / "a", "atari_pongg", 0, [(1, 1.0)])
    result = run_script(str(tmp_path / "a"))
    assert result.returncode == 2 and "unknown task 'atari_pongg'" in result.stderr
    make_run(tmp_path / "b", "atari_pong", 0, [(1, 1.0)])
    result = run_script(str(tmp_path / "b"), "--metric", "eval_retrun", "--allow-partial")
    assert result.returncode == 2
    assert "metric 'eval_retrun' appears in no metrics.jsonl" in result.stderr and "eval_return" in result.stderr


def test_script_runs_from_the_command_line():
    def cli(*args):
        return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO)

    assert cli("--help").returncode == 0
    reference = cli("--no-per-game")
    assert reference.returncode == 0
    assert "| IQN (Table K1) | — | 55/55 | 1.29 | 11.18 | 0.21 | 0.21 |" in reference.stdout
    result = cli("--last", "0")
    assert result.returncode == 2 and result.stderr == "error: --last must be >= 1, got 0 (see --help)\n"


def test_script_skips_non_atari_runs_in_a_shared_logdir(tmp_path):
    make_run(tmp_path / "logdir", "atari_pong", 0, [(1, 7.0)])
    make_run(tmp_path / "logdir", "gym_CartPole-v1", 0, [(1, 200.0)], action_repeat=1)
    result = run_script(str(tmp_path / "logdir"), "--allow-partial", "--json")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 runs of non-Atari tasks (gym_CartPole-v1)" in result.stderr
    assert json.loads(result.stdout)["games"] == ["atari_pong"]
    only_other = run_script(str(tmp_path / "logdir" / "gym_CartPole-v1"))
    assert only_other.returncode == 2
    assert only_other.stderr.strip() == ("error: no Atari runs found, only gym_CartPole-v1; "
                                         "scores cover the 55 Atari games")
