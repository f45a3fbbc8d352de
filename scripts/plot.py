"""Learning curves from run logdirs: one panel per task, mean and spread over seeds, paper references.

Examples:
  python scripts/plot.py logdir/atari --out curves.png            # every run below logdir/atari
  python scripts/plot.py ours=logdir/atari base=old/atari --bins 50 --spread std --out cmp.pdf
  python scripts/plot.py logdir/gym_CartPole-v1 --xkey step --out cartpole.png
  python scripts/plot.py release=runs/release ours=runs/ours --xkey step --table --out side_by_side.png

Values logged at the same step (one eval line per episode) are averaged into one evaluation first.
--table prints, per task, each seed's best and final evaluation and the difference of each method
from the first over the last steps, with a bootstrap interval over seeds (markdown on stdout).

Atari panels show the Table K1 final scores (200M frames) of Rainbow, IQN and DreamerV2 as
horizontal lines, like the paper's Figure F1.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from dreamerv2_tf.cli import ArgumentParser, warnings_as_lines
from dreamerv2_tf.tools import agreement
from dreamerv2_tf.tools import scores as S

DEFAULT_NAME = "dreamerv2_tf"
FORMATS = (".png", ".pdf", ".svg")
# Paper reference lines: (Table K1 column, label, color, line style).
REFERENCES = (
    ("dreamerv2", "DreamerV2 (paper)", "black", "--"),
    ("iqn", "IQN (paper)", "tab:gray", ":"),
    ("rainbow", "Rainbow (paper)", "tab:brown", "-."),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="plot.py",
        description="Plot learning curves of runs (metrics.jsonl + config.yaml), one panel per task, with the "
                    "mean and spread over seeds of the same task and method.",
        epilog="INPUT is a run logdir or a directory searched recursively for metrics.jsonl. Prefix NAME= to "
               "name the method of an input; unnamed inputs form one method called --name.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="[NAME=]LOGDIR or [NAME=]DIR")
    parser.add_argument("--out", default="curves.png", help="output file, .png, .pdf or .svg (default: %(default)s)")
    parser.add_argument("--metric", default="eval_return", help="metrics.jsonl key to plot (default: %(default)s)")
    parser.add_argument("--xkey", default="frames", choices=("frames", "step"),
                        help="x axis: environment frames (step x action_repeat when not logged) or agent steps "
                             "(default: %(default)s)")
    parser.add_argument("--bins", type=int, default=30,
                        help="average each run within this many equal x bins before combining seeds; "
                             "0 plots every run unbinned (default: %(default)s)")
    parser.add_argument("--spread", default="minmax", choices=("minmax", "std", "none"),
                        help="shaded band over seeds: min to max, mean +- std, or none (default: %(default)s)")
    parser.add_argument("--cols", type=int, default=5, help="panels per row (default: %(default)s)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="plot only these tasks")
    parser.add_argument("--name", default=DEFAULT_NAME, help="method name of unnamed inputs (default: %(default)s)")
    parser.add_argument("--no-refs", action="store_true",
                        help="no paper reference lines (they are drawn on Atari panels for return metrics)")
    parser.add_argument("--title", default="", help="figure title")
    parser.add_argument("--ylim", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="y-axis range of every panel (default: fitted to the data)")
    parser.add_argument("--table", action="store_true",
                        help="also print per task a markdown table of each seed's best and final evaluation "
                             "and each method's difference from the first with a bootstrap interval over "
                             "seeds; the 'wrote' line then goes to stderr")
    parser.add_argument("--last-fraction", type=float, default=0.2, metavar="FRACTION",
                        help="with --table: the difference is of the mean over this last fraction of the "
                             "steps of the shortest run (default: %(default)s)")
    parser.add_argument("--resamples", type=int, default=10_000, metavar="N",
                        help="with --table: bootstrap resamples of the seeds (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0 < args.last_fraction <= 1:
        parser.error(f"--last-fraction must be in (0, 1], got {args.last_fraction:g}")
    if args.resamples < 100:
        parser.error(f"--resamples must be >= 100, got {args.resamples}")
    if args.bins < 0:
        parser.error(f"--bins must be >= 0, got {args.bins}")
    if args.cols < 1:
        parser.error(f"--cols must be >= 1, got {args.cols}")
    if args.ylim and not args.ylim[0] < args.ylim[1]:
        parser.error(f"--ylim LOW must be below HIGH, got {args.ylim[0]:g} {args.ylim[1]:g}")
    if Path(args.out).suffix.lower() not in FORMATS:
        parser.error(f"--out must end in one of {', '.join(FORMATS)}, got '{args.out}'")
    return args


def load_curves(args: argparse.Namespace) -> dict[tuple[str, str], list[S.Curve]]:
    """(method, task) -> curves with at least one value of the metric."""
    groups: dict[tuple[str, str], list[S.Curve]] = {}
    empty, keys = [], set()
    for text in args.inputs:
        name, path = S.split_label(text, args.name)
        for logdir in S.find_logdirs(path):
            try:
                curve = S.read_curve(logdir, args.metric)
            except UnicodeDecodeError as exc:
                raise S.not_text_error(logdir, exc) from None
            curve = S.per_evaluation(curve)
            keys |= curve.keys
            if len(curve.value):
                groups.setdefault((name, curve.task), []).append(curve)
            else:
                empty.append(curve)
    if not groups:
        if args.metric not in keys:
            known = ", ".join(sorted(k for k in keys if k not in ("step", "frames", "time"))[:12])
            raise S.ScoreError(f"metric '{args.metric}' appears in no metrics.jsonl; keys seen: {known or 'none'}")
        raise S.ScoreError(f"no run has a '{args.metric}' value yet")
    if args.tasks:
        found = {task for _, task in groups}
        unknown = [task for task in args.tasks if task not in found]
        if unknown:
            raise S.ScoreError(f"--tasks: no runs of {', '.join(unknown)}; tasks found: {', '.join(sorted(found))}")
        groups = {key: curves for key, curves in groups.items() if key[1] in args.tasks}
    if empty:
        print(f"note: skipped {len(empty)} runs without '{args.metric}' values", file=sys.stderr)
    return groups


def bin_curve(x: np.ndarray, y: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Mean of y within each bin (lo, hi] (the first bin includes its left edge); NaN where empty."""
    index = np.clip(np.searchsorted(edges, x, side="left") - 1, 0, len(edges) - 2)
    sums = np.bincount(index, weights=y, minlength=len(edges) - 1)
    counts = np.bincount(index, minlength=len(edges) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def summarize(curves: list[S.Curve], xkey: str, bins: int, spread: str):
    """Mean x of each bin's points, mean over seeds, and the band (low, high) or None.

    Points sit at the mean x of what fell into the bin, so evaluations on a regular grid are drawn
    at their own steps rather than at bin centres.
    """
    xs = np.concatenate([curve.x(xkey) for curve in curves])
    xmax = float(xs.max())
    edges = np.linspace(0.0, xmax if xmax > 0 else 1.0, bins + 1)
    stack = np.stack([bin_curve(curve.x(xkey), curve.value, edges) for curve in curves])
    centers = bin_curve(xs, xs, edges)
    valid = ~np.all(np.isnan(stack), axis=0)
    stack, centers = stack[:, valid], centers[valid]
    mean = np.nanmean(stack, axis=0)
    if spread == "none" or len(curves) == 1:
        return centers, mean, None
    if spread == "std":
        std = np.nanstd(stack, axis=0)
        return centers, mean, (mean - std, mean + std)
    return centers, mean, (np.nanmin(stack, axis=0), np.nanmax(stack, axis=0))


def task_order(task: str) -> tuple[int, int | str]:
    """Atari games in Table K1 order, then other tasks alphabetically."""
    return (0, S.GAMES.index(task)) if task in S.GAMES else (1, task)


def short_number(value: float, _position: object = None) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def make_figure(args: argparse.Namespace, groups: dict[tuple[str, str], list[S.Curve]]) -> plt.Figure:
    methods = list(dict.fromkeys(method for method, _ in groups))
    tasks = sorted({task for _, task in groups}, key=task_order)
    colors = {method: f"C{index % 10}" for index, method in enumerate(methods)}
    refs_wanted = not args.no_refs and args.metric.endswith("return")
    cols = min(args.cols, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    legend_entries = len(methods) + (len(REFERENCES) if refs_wanted else 0)
    width = max(3.2 * cols, 4.8)
    legend_cols = max(1, min(legend_entries, int(width / 1.9)))
    legend_rows = math.ceil(legend_entries / legend_cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width, 2.5 * rows + 0.3 + 0.25 * legend_rows), squeeze=False)
    drew_refs = False
    for index, task in enumerate(tasks):
        ax = axes[index // cols][index % cols]
        for method in methods:
            curves = groups.get((method, task))
            if not curves:
                continue
            color = colors[method]
            if args.bins == 0:
                for curve in curves:
                    order = np.argsort(curve.x(args.xkey), kind="stable")
                    ax.plot(curve.x(args.xkey)[order], curve.value[order], color=color, lw=1, alpha=0.8)
                continue
            centers, mean, band = summarize(curves, args.xkey, args.bins, args.spread)
            ax.plot(centers, mean, color=color, lw=1.5, marker="o" if len(mean) < 3 else None, ms=3)
            if band is not None:
                ax.fill_between(centers, band[0], band[1], color=color, alpha=0.2, lw=0)
        if refs_wanted and task in S.GAMES:
            row = S.load_table()[task]
            for key, _, color, style in REFERENCES:
                ax.axhline(getattr(row, key), color=color, ls=style, lw=1)
            drew_refs = True
        if args.ylim:
            ax.set_ylim(*args.ylim)
        ax.set_title(S.game_name(task), fontsize=10)
        ax.xaxis.set_major_formatter(FuncFormatter(short_number))
        ax.yaxis.set_major_formatter(FuncFormatter(short_number))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if index // cols == rows - 1 or index + cols >= len(tasks):
            ax.set_xlabel("Frames" if args.xkey == "frames" else "Agent steps", fontsize=9)
        if index % cols == 0:
            ax.set_ylabel(args.metric, fontsize=9)
    for index in range(len(tasks), rows * cols):
        axes[index // cols][index % cols].axis("off")
    handles = [Line2D([], [], color=colors[method], lw=2) for method in methods]
    labels = list(methods)
    if drew_refs:
        handles += [Line2D([], [], color=color, ls=style, lw=1) for _, _, color, style in REFERENCES]
        labels += [label for _, label, _, _ in REFERENCES]
    legend_height = (0.1 + 0.25 * math.ceil(len(labels) / legend_cols)) / fig.get_figheight()
    fig.legend(handles, labels, loc="lower center", ncol=legend_cols, frameon=False, fontsize=9)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout(rect=(0, legend_height, 1, 1))
    return fig


def plot(args: argparse.Namespace, groups: dict[tuple[str, str], list[S.Curve]]) -> Path:
    fig = make_figure(args, groups)
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def tables(args: argparse.Namespace, groups: dict[tuple[str, str], list[S.Curve]]) -> str:
    """The --table markdown of every task, in panel order."""
    parts = []
    for task in sorted({task for _, task in groups}, key=task_order):
        runs = {method: curves for (method, name), curves in groups.items() if name == task}
        summaries, differences, window = agreement.compare(task, runs, args.last_fraction, args.resamples)
        parts.append(agreement.markdown(task, args.metric, summaries, differences, window, args.last_fraction,
                                        args.resamples))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with warnings_as_lines():
        try:
            groups = load_curves(args)
        except S.ScoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        text = tables(args, groups) if args.table else ""
    out = plot(args, groups)
    runs = sum(len(curves) for curves in groups.values())
    print(text, end="")
    print(f"wrote {out} ({len({task for _, task in groups})} tasks, {runs} runs)",
          file=sys.stderr if args.table else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
