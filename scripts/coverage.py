"""Compare how widely runs spread over a vector observation in their first N agent steps.

Example (the exploration check of docs/learning_checks.md):
  python scripts/coverage.py plan2explore=runs/p2e random=runs/random --key position --steps 50000

Prints, per run, the occupied cells of a shared grid over the key's dimensions, the key's range
per dimension, and the mean return of the episodes that end within the steps. `--dims 1,2`
restricts the grid to some of the key's dimensions (for DMC cartpole's position: 0 is the cart,
1 and 2 the pole's cosine and sine).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dreamerv2_tf.cli import ArgumentParser, fail
from dreamerv2_tf.tools import coverage
from dreamerv2_tf.tools.scores import split_label


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="coverage.py", description="State coverage of runs' stored training episodes.")
    parser.add_argument("runs", nargs="+", metavar="NAME=LOGDIR",
                        help="a run logdir (its train_episodes are read) or an episode directory")
    parser.add_argument("--key", required=True, help="vector observation key, e.g. position")
    parser.add_argument("--steps", type=int, required=True, help="agent steps read from each run")
    parser.add_argument("--dims", type=lambda text: [int(d) for d in text.split(",")], default=None,
                        help="only these dimensions of the key, e.g. 1,2 (default: all)")
    parser.add_argument("--bins", type=int, default=20, help="grid bins per dimension (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.bins < 1:
        parser.error("--steps and --bins must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    states = {}
    for text in args.runs:
        name, path = split_label(text, text)
        directory = path / "train_episodes" if (path / "train_episodes").is_dir() else path
        try:
            states[name] = coverage.read_states(directory, args.key, args.steps)
        except ValueError as exc:
            fail(str(exc))
        if args.dims is not None:
            width = states[name].values.shape[1]
            if not all(0 <= d < width for d in args.dims):
                fail(f"--dims {','.join(map(str, args.dims))}: '{args.key}' has dimensions 0 to {width - 1}")
            states[name].values = states[name].values[:, args.dims]
    cells, grid = coverage.occupied_cells({name: s.values for name, s in states.items()}, args.bins)
    rows = {name: {"steps": args.steps, "episodes": s.episodes, "cells": cells[name], "grid": grid,
                   "low": np.round(s.values.min(0), 3).tolist(), "high": np.round(s.values.max(0), 3).tolist(),
                   "mean_return": float(np.mean(s.returns)) if s.returns else None}
            for name, s in states.items()}
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"| run | steps | episodes | cells of {grid} | range of {args.key} | mean return |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        ranges = ", ".join(f"[{lo:g}, {hi:g}]" for lo, hi in zip(row["low"], row["high"], strict=True))
        ret = "—" if row["mean_return"] is None else f"{row['mean_return']:.1f}"
        print(f"| {name} | {row['steps']} | {row['episodes']} | {row['cells']} | {ranges} | {ret} |")


if __name__ == "__main__":
    main()
