"""Atari score tables like paper Table 1 (aggregates) and Table K1 (per game) from runs or CSV files.

Examples:
  python scripts/scores.py                                   # reference rows from Table K1 only
  python scripts/scores.py logdir/atari                      # every run below logdir/atari
  python scripts/scores.py ours=logdir/atari base=other/runs --last 5
  python scripts/scores.py results.csv --json                # CSV columns: task,score[,seed][,method]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from dreamerv2_tf.cli import ArgumentParser, warnings_as_lines
from dreamerv2_tf.tools import scores as S

DEFAULT_NAME = "dreamerv2_tf"
NO_VALUE = "—"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="scores.py",
        description="Aggregate Atari scores the four ways of paper Table 1 (per seed, then averaged over "
                    "seeds) and list per-game scores next to Table K1.",
        epilog="INPUT is a run logdir, a directory searched recursively for metrics.jsonl (each run needs "
               "config.yaml with task and seed), or a CSV file with columns task,score and optional "
               "seed,method. Prefix NAME= to name the method of an input; unnamed inputs form one method "
               "called --name. Without inputs, only the reference rows from Table K1 are shown.",
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="[NAME=]LOGDIR, [NAME=]DIR or [NAME=]FILE.csv")
    parser.add_argument("--metric", default="eval_return", help="metrics.jsonl key of the score (default: %(default)s)")
    parser.add_argument("--last", type=int, default=1,
                        help="final score = mean of the last K evaluations of a run; values logged at the same "
                             "step count as one evaluation (default: %(default)s)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="method name of unnamed inputs (default: %(default)s)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="aggregate even if games are missing; the output is marked partial")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of Markdown")
    parser.add_argument("--no-per-game", action="store_true", help="omit the per-game table")
    args = parser.parse_args(argv)
    if args.last < 1:
        parser.error(f"--last must be >= 1, got {args.last}")
    if not args.name.strip():
        parser.error("--name must not be empty")
    return args


def collect(args: argparse.Namespace) -> tuple[list[S.Score], list[S.Curve], list[S.Curve]]:
    scores, empty, skipped = [], [], []
    for text in args.inputs:
        name, path = S.split_label(text, args.name)
        try:
            if path.is_file() and path.suffix.lower() == ".csv":
                scores += S.scores_from_csv(path, name)
            elif path.is_file():
                raise S.ScoreError(f"{path} is a file but not a .csv; give a run logdir, a folder of runs or a CSV")
            else:
                found, none_yet, other = S.scores_from_logdirs([path], name, args.metric, args.last)
                scores += found
                empty += none_yet
                skipped += other
        except UnicodeDecodeError as exc:
            raise S.not_text_error(path, exc) from None
    return scores, empty, skipped


def missing_report(grouped: dict) -> dict[str, dict[str, list[str]]]:
    """method -> seed -> games the seed lacks (only non-empty entries)."""
    report = {}
    for method, seeds in grouped.items():
        for seed, games in seeds.items():
            missing = S.missing_games(games)
            if missing:
                report.setdefault(method, {})[str(seed)] = missing
    return report


def missing_message(missing: dict[str, dict[str, list[str]]]) -> str:
    parts = []
    for method, seeds in missing.items():
        for seed, games in seeds.items():
            shown = ", ".join(games[:10]) + (f" and {len(games) - 10} more" if len(games) > 10 else "")
            parts.append(f"'{method}' seed {seed} misses {len(games)} of {len(S.GAMES)} games ({shown})")
    return (f"incomplete benchmark: {'; '.join(parts)}; pass --allow-partial to aggregate the games present "
            f"(the output is then marked partial)")


def build_result(args: argparse.Namespace, scores: list[S.Score]) -> dict[str, Any]:
    grouped = S.group_scores(scores)
    missing = missing_report(grouped)
    if missing and not args.allow_partial:
        raise S.ScoreError(missing_message(missing))
    covered = sorted({item.task for item in scores}, key=S.GAMES.index) if scores else list(S.GAMES)
    partial = len(covered) < len(S.GAMES) or bool(missing)
    methods = {}
    for method, seeds in grouped.items():
        order = sorted(seeds, key=S.seed_order)
        per_seed = {str(seed): S.aggregate(seeds[seed]) for seed in order}
        games = {}
        for task in S.GAMES:
            values = {str(seed): seeds[seed][task] for seed in order if task in seeds[seed]}
            if values:
                mean = float(np.mean(list(values.values())))
                games[task] = {
                    "scores": values, "mean": mean, "std": float(np.std(list(values.values()))),
                    "gamer_normalized": S.normalize(task, mean, "gamer"),
                    "record_normalized": S.normalize(task, mean, "record"),
                }
        frames = [item.frames for item in scores if item.method == method and item.frames is not None]
        methods[method] = {
            "seeds": [str(seed) for seed in order],
            "games_covered": len(games),
            "aggregate": S.aggregate_seeds({seed: seeds[seed] for seed in order}),
            "per_seed": per_seed,
            "missing": missing.get(method, {}),
            "frames": {"min": min(frames), "max": max(frames)} if frames else None,
            "games": games,
        }
    # With partial input the reference rows use the same games, so the rows stay comparable.
    reference = {
        label: S.aggregate({task: value for task, value in S.reference_scores(key).items() if task in covered})
        for key, label in S.REFERENCE_METHODS.items()
    }
    return {
        "metric": args.metric, "last": args.last, "partial": partial, "games": covered,
        "methods": methods, "reference": reference,
    }


def fmt_score(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 or float(value).is_integer() else f"{value:.1f}"


def fmt_metric(value: float) -> str:
    return f"{value:.2f}"


def markdown(result: dict[str, Any], per_game: bool = True) -> str:
    if result["methods"]:
        title = f"# Atari scores ({result['metric']}, mean of the last {result['last']} evaluation(s) per run)"
    else:
        title = "# Atari reference scores (paper Table K1)"
    lines = [title, ""]
    total, covered = len(S.GAMES), len(result["games"])
    if result["partial"]:
        lines += [f"**PARTIAL: the input covers {covered} of {total} games (see Missing); these aggregates "
                  f"are not comparable to paper Table 1.**", ""]
    header = ["Agent", "Seeds", "Games", *S.METRIC_NAMES.values()]
    lines += ["## Aggregate scores (paper Table 1 metrics)", "", _row(header), _row(["---"] * len(header))]
    for method, info in result["methods"].items():
        label = f"{method} (partial)" if info["missing"] or info["games_covered"] < total else method
        cells = [label, str(len(info["seeds"])), f"{info['games_covered']}/{total}"]
        lines.append(_row(cells + [fmt_metric(info["aggregate"][m]) for m in S.METRICS]))
    for label, values in result["reference"].items():
        cells = [f"{label} (Table K1)", NO_VALUE, f"{covered}/{total}"]
        lines.append(_row(cells + [fmt_metric(values[m]) for m in S.METRICS]))
    lines += ["", "Each method is aggregated per seed, then averaged over seeds. Reference rows aggregate the "
              "published per-game final scores of paper Table K1 (200M frames)"
              + (f", restricted to the same {covered} games." if covered < total else ".")]
    if per_game:
        lines += ["", "## Per game", ""]
        names = list(result["methods"])
        header = ["Game", "Random", "Gamer", "Record", "Rainbow", "IQN", "DreamerV2", *names]
        lines += [_row(header), _row(["---"] * len(header))]
        table = S.load_table()
        for task in S.GAMES:
            row = table[task]
            cells = [row.game] + [fmt_score(getattr(row, key)) for key in
                                  ("random", "gamer", "record", "rainbow", "iqn", "dreamerv2")]
            for name in names:
                game = result["methods"][name]["games"].get(task)
                if game is None:
                    cells.append(NO_VALUE)
                elif len(game["scores"]) > 1:
                    cells.append(f"{fmt_score(game['mean'])} ± {fmt_score(game['std'])}")
                else:
                    cells.append(fmt_score(game["mean"]))
            lines.append(_row(cells))
    missing = {m: info["missing"] for m, info in result["methods"].items() if info["missing"]}
    if missing:
        lines += ["", "## Missing", ""]
        for method, seeds in missing.items():
            for seed, games in seeds.items():
                lines.append(f"- {method} seed {seed}: {len(games)} games: {', '.join(games)}")
    return "\n".join(lines) + "\n"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with warnings_as_lines():
            scores, empty, skipped = collect(args)
        if args.inputs and not scores:
            if skipped and not empty:
                tasks = ", ".join(sorted({curve.task for curve in skipped}))
                raise S.ScoreError(f"no Atari runs found, only {tasks}; scores cover the 55 Atari games")
            raise S.ScoreError(f"no Atari run has a '{args.metric}' value yet ({len(empty)} runs found)")
        result = build_result(args, scores)
    except S.ScoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if skipped:
        tasks = ", ".join(sorted({curve.task for curve in skipped}))
        print(f"note: skipped {len(skipped)} runs of non-Atari tasks ({tasks})", file=sys.stderr)
    if empty:
        paths = ", ".join(str(curve.path) for curve in empty[:5]) + (" ..." if len(empty) > 5 else "")
        print(f"note: {len(empty)} runs have no '{args.metric}' yet and count as missing: {paths}",
              file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(markdown(result, per_game=not args.no_per_game), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
