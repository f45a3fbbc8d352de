"""Eval curves of implementations on one task side by side: each seed's best and final evaluation, and
the difference of the mean over the last part of the steps with a bootstrap interval over seeds.

An evaluation is the mean of the values logged at one step (`scores.per_evaluation`). Each seed's
statistic is the mean of its evaluations within the window: the last `fraction` of the steps of the
shortest run of the task, so every run is judged over the same steps. The interval is a percentile
bootstrap: seeds are resampled with replacement within each implementation. Pure numpy; problems
are `warnings.warn` lines, and nothing here prints.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dreamerv2_tf.tools.scores import Curve, per_evaluation, seed_order

BOOTSTRAP_SEED = 0  # the interval is the same each time the table is printed


@dataclass(frozen=True)
class SeedSummary:
    """One run's evaluations: the best and the last, with their steps, and the mean within the window."""

    method: str
    seed: int | str
    path: Path
    best: float
    best_step: float
    final: float
    final_step: float
    window_mean: float | None  # None when the run has no evaluation within the window


@dataclass(frozen=True)
class Difference:
    """mean(other) - mean(reference) over seeds, with its bootstrap interval (None below 2 seeds a side)."""

    reference: str
    other: str
    reference_mean: float
    other_mean: float
    reference_seeds: int
    other_seeds: int
    value: float
    low: float | None
    high: float | None


def last_window(curves: Sequence[Curve], fraction: float) -> tuple[float, float]:
    """(start, end) steps: the last `fraction` of the steps up to the shortest run's last evaluation."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    end = min(float(curve.step.max()) for curve in curves)
    return (1 - fraction) * end, end


def summarize_seed(method: str, curve: Curve, window: tuple[float, float]) -> SeedSummary:
    evaluations = per_evaluation(curve)
    steps, values = evaluations.step, evaluations.value
    best = int(np.argmax(values))  # the first of equal bests
    inside = (steps >= window[0]) & (steps <= window[1])
    return SeedSummary(
        method=method, seed=curve.seed, path=curve.path,
        best=float(values[best]), best_step=float(steps[best]),
        final=float(values[-1]), final_step=float(steps[-1]),
        window_mean=float(values[inside].mean()) if inside.any() else None,
    )


def bootstrap_difference(reference: Sequence[float], other: Sequence[float], resamples: int = 10_000,
                         level: float = 0.95, seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """mean(other) - mean(reference) and the percentile bootstrap interval at `level`."""
    reference, other = np.asarray(reference, float), np.asarray(other, float)
    if not len(reference) or not len(other):
        raise ValueError("bootstrap_difference needs at least one value on each side")
    rng = np.random.default_rng(seed)
    reference_means = reference[rng.integers(len(reference), size=(resamples, len(reference)))].mean(axis=1)
    other_means = other[rng.integers(len(other), size=(resamples, len(other)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(other_means - reference_means, [tail, 1 - tail])
    return float(other.mean() - reference.mean()), float(low), float(high)


def compare(task: str, runs: Mapping[str, Sequence[Curve]], fraction: float = 0.2,
            resamples: int = 10_000) -> tuple[list[SeedSummary], list[Difference], tuple[float, float]]:
    """Seed summaries of every method of one task, and every later method against the first."""
    curves = [curve for group in runs.values() for curve in group if len(curve.value)]
    if not curves:
        raise ValueError(f"{task}: no run has a value to compare")
    window = last_window(curves, fraction)
    ends = [float(curve.step.max()) for curve in curves]
    if max(ends) > min(ends):
        warnings.warn(f"{task}: the runs' last evaluations are at {_steps(min(ends))} to {_steps(max(ends))} "
                      f"steps; every run is judged on {_steps(window[0])} to {_steps(window[1])}", stacklevel=2)
    summaries = []
    for method, group in runs.items():
        seen: dict[int | str, Path] = {}
        for curve in sorted((c for c in group if len(c.value)), key=lambda c: seed_order(c.seed)):
            if curve.seed in seen:
                warnings.warn(f"{task}: '{method}' has seed {curve.seed} twice ({seen[curve.seed]} and "
                              f"{curve.path}); both count as seeds", stacklevel=2)
            seen[curve.seed] = curve.path
            summary = summarize_seed(method, curve, window)
            if summary.window_mean is None:
                warnings.warn(f"{task}: {curve.path} has no evaluation from {_steps(window[0])} to "
                              f"{_steps(window[1])} steps; it is left out of the difference", stacklevel=2)
            summaries.append(summary)
    means = {method: [s.window_mean for s in summaries if s.method == method and s.window_mean is not None]
             for method in runs}
    present = [method for method in runs if means[method]]
    if len(present) < 2:
        warnings.warn(f"{task}: only {', '.join(repr(m) for m in present) or 'no method'} has evaluations "
                      f"to compare; no difference", stacklevel=2)
    differences = []
    for other in present[1:]:
        reference = present[0]
        value, low, high = bootstrap_difference(means[reference], means[other], resamples)
        enough = min(len(means[reference]), len(means[other])) >= 2
        differences.append(Difference(
            reference=reference, other=other, reference_mean=float(np.mean(means[reference])),
            other_mean=float(np.mean(means[other])), reference_seeds=len(means[reference]),
            other_seeds=len(means[other]), value=value,
            low=low if enough else None, high=high if enough else None))
    return summaries, differences, window


def markdown(task: str, metric: str, summaries: Sequence[SeedSummary], differences: Sequence[Difference],
             window: tuple[float, float], fraction: float, resamples: int) -> str:
    """The task's seed table and its agreement statements, ready to paste into a page."""
    share = f"last {fraction:.0%}"
    lines = [f"### {task}", "",
             f"| Implementation | Seed | Best {metric} (step) | Final {metric} (step) | Mean, {share} |",
             "|---|---|---|---|---|"]
    for s in summaries:
        window_mean = "—" if s.window_mean is None else f"{s.window_mean:.1f}"
        lines.append(f"| {s.method} | {s.seed} | {s.best:.1f} ({_steps(s.best_step)}) | "
                     f"{s.final:.1f} ({_steps(s.final_step)}) | {window_mean} |")
    lines += ["", f"An evaluation is the mean {metric} of its episodes; best is the highest evaluation of a "
              f"seed, final its last. The {share} of the steps, of the shortest run, are {_steps(window[0])} to "
              f"{_steps(window[1])}."]
    for d in differences:
        text = (f"Mean {metric} over the {share} of the steps: {d.reference} {d.reference_mean:.1f} "
                f"({_seeds(d.reference_seeds)}), {d.other} {d.other_mean:.1f} ({_seeds(d.other_seeds)}). "
                f"Difference {d.other} − {d.reference}: {d.value:+.1f}")
        if d.low is None:
            text += "; no interval: the bootstrap needs at least 2 seeds of each."
        else:
            verdict = "includes" if d.low <= 0 <= d.high else "excludes"
            text += (f", 95% bootstrap interval [{d.low:+.1f}, {d.high:+.1f}] (seeds resampled with "
                     f"replacement within each implementation, {resamples:,} resamples); the interval "
                     f"{verdict} 0.")
        lines += ["", text]
    return "\n".join(lines) + "\n"


def _steps(value: float) -> str:
    return f"{value:,.0f}"


def _seeds(count: int) -> str:
    return f"{count} seed" + ("s" if count != 1 else "")
