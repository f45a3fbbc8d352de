"""Atari reference scores (paper Table K1), the four aggregate metrics of Table 1, and run reading.

Scores are normalised per game by the random and human gamer scores,
(score - random) / (gamer - random), and by the random and human world record
scores. The four metrics are the median and mean of the gamer-normalised
scores, the mean of the record-normalised scores, and the mean of the
record-normalised scores clipped above at 1 ("clipping the scores to not exceed
a value of 1", paper Section 3; scores below random stay negative, which is
what reproduces Table 1's Rainbow row). The paper computes aggregates for each
seed and then averages them across seeds; `aggregate_seeds` does exactly that.

Run logdirs hold `config.yaml` (with `task` and `seed`) and `metrics.jsonl`
(one JSON object per line with `step`, `frames` and scalars). Pure Python and
numpy: no TensorFlow import, so scripts that only read results start fast.
"""

from __future__ import annotations

import csv
import difflib
import functools
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

DATA_FILE = Path(__file__).resolve().parent.parent / "data" / "atari_scores.csv"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"

# Aggregate metrics in the column order of paper Table 1.
METRICS = ("gamer_median", "gamer_mean", "record_mean", "clipped_record_mean")
METRIC_NAMES = {
    "gamer_median": "Gamer Median",
    "gamer_mean": "Gamer Mean",
    "record_mean": "Record Mean",
    "clipped_record_mean": "Clipped Record Mean",
}
# Final scores at 200M frames shipped in Table K1, with their display names.
REFERENCE_METHODS = {"dreamerv2": "DreamerV2", "iqn": "IQN", "rainbow": "Rainbow"}


class ScoreError(ValueError):
    """A user mistake in score inputs; scripts print it as one line and exit 2."""


@dataclass(frozen=True)
class GameScores:
    """One row of Table K1: baselines and the published final scores of one game."""

    task: str
    game: str
    random: float
    gamer: float
    record: float
    rainbow: float
    iqn: float
    dreamerv2: float


@functools.lru_cache(maxsize=4)
def load_table(path: str | Path = DATA_FILE) -> dict[str, GameScores]:
    """Table K1 keyed by task name (`atari_pong`), in the paper's game order."""
    rows = [line for line in Path(path).read_text().splitlines() if line and not line.startswith("#")]
    table = {}
    for row in csv.DictReader(rows):
        numbers = {key: float(row[key]) for key in ("random", "gamer", "record", *REFERENCE_METHODS)}
        table[row["task"]] = GameScores(task=row["task"], game=row["game"], **numbers)
    return table


GAMES: tuple[str, ...] = tuple(load_table())


def is_atari(task: str) -> bool:
    return task.startswith("atari_")


def check_task(task: str, source: str = "") -> str:
    """Return the task if Table K1 has it, else raise a ScoreError naming close matches."""
    if task in load_table():
        return task
    where = f" in {source}" if source else ""
    close = difflib.get_close_matches(task, GAMES, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ScoreError(
        f"unknown task '{task}'{where}: scores cover the {len(GAMES)} Atari games of paper Table K1 "
        f"(atari_alien ... atari_zaxxon){hint}"
    )


def game_name(task: str) -> str:
    """Display name of an Atari task ('atari_james_bond' -> 'James Bond'); other tasks unchanged."""
    row = load_table().get(task)
    return row.game if row else task


def normalize(task: str, score: float, by: str = "gamer") -> float:
    """(score - random) / (baseline - random) with baseline the human gamer or world record score."""
    if by not in ("gamer", "record"):
        raise ValueError(f"normalize: by must be 'gamer' or 'record', got {by!r}")
    row = load_table()[check_task(task)]
    return (score - row.random) / (getattr(row, by) - row.random)


def aggregate(scores: Mapping[str, float]) -> dict[str, float]:
    """The four Table 1 metrics over the games given (one seed: task -> raw score)."""
    if not scores:
        raise ScoreError("no game scores to aggregate")
    gamer = np.array([normalize(task, score, "gamer") for task, score in scores.items()])
    record = np.array([normalize(task, score, "record") for task, score in scores.items()])
    return {
        "gamer_median": float(np.median(gamer)),
        "gamer_mean": float(np.mean(gamer)),
        "record_mean": float(np.mean(record)),
        # Clipped only above: exceeding the record earns nothing extra, doing worse than random still costs.
        "clipped_record_mean": float(np.mean(np.minimum(record, 1.0))),
    }


def aggregate_seeds(per_seed: Mapping[Any, Mapping[str, float]]) -> dict[str, float]:
    """Aggregate each seed over its games, then average the metrics across seeds (paper protocol)."""
    if not per_seed:
        raise ScoreError("no seeds to aggregate")
    results = [aggregate(scores) for scores in per_seed.values()]
    return {metric: float(np.mean([result[metric] for result in results])) for metric in METRICS}


def reference_scores(method: str) -> dict[str, float]:
    """Published final scores of 'dreamerv2', 'iqn' or 'rainbow' per task (Table K1)."""
    if method not in REFERENCE_METHODS:
        raise ValueError(f"unknown reference method {method!r}; choices: {', '.join(REFERENCE_METHODS)}")
    return {task: getattr(row, method) for task, row in load_table().items()}


def missing_games(tasks: Iterable[str]) -> list[str]:
    """Games of the benchmark absent from `tasks`, in Table K1 order."""
    present = set(tasks)
    return [task for task in GAMES if task not in present]


# Reading runs.


@dataclass
class Curve:
    """One metric of one run: values with their agent steps and frames, in file order."""

    path: Path
    task: str
    seed: int | str
    metric: str
    step: np.ndarray = field(default_factory=lambda: np.zeros(0))
    frames: np.ndarray = field(default_factory=lambda: np.zeros(0))
    value: np.ndarray = field(default_factory=lambda: np.zeros(0))
    keys: frozenset[str] = frozenset()

    def x(self, xkey: str) -> np.ndarray:
        if xkey not in ("frames", "step"):
            raise ValueError(f"x key must be 'frames' or 'step', got {xkey!r}")
        return self.frames if xkey == "frames" else self.step


def find_logdirs(path: str | Path) -> list[Path]:
    """The run directories at or below `path`: every directory holding a metrics.jsonl."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ScoreError(f"no such file or directory: {path}")
    if not path.is_dir():
        raise ScoreError(f"{path} is not a directory (expected a run logdir or a folder of runs)")
    if (path / METRICS_FILE).is_file():
        return [path]
    found = sorted(file.parent for file in path.rglob(METRICS_FILE) if file.is_file())
    if not found:
        raise ScoreError(f"no {METRICS_FILE} found in or below {path}")
    return found


def read_config(logdir: str | Path) -> dict[str, Any]:
    """The run's config.yaml as a dict; it must name the task and the seed."""
    file = Path(logdir) / CONFIG_FILE
    if not file.is_file():
        raise ScoreError(f"run {logdir} has {METRICS_FILE} but no {CONFIG_FILE} (needed for task and seed)")
    try:
        config = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ScoreError(f"cannot parse {file}: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise ScoreError(f"{file} must be a YAML mapping with 'task' and 'seed'")
    for key in ("task", "seed"):
        if key not in config:
            raise ScoreError(f"{file} has no '{key}' key")
    return config


def read_curve(logdir: str | Path, metric: str = "eval_return") -> Curve:
    """Read one metric of a run; frames fall back to step x action_repeat when not logged.

    A line that is not a JSON object is skipped with a warning naming the file and its line numbers:
    a run killed mid-write leaves a cut line, at the end or, once resumed, in the middle.
    """
    logdir = Path(logdir)
    config = read_config(logdir)
    repeat = config.get("action_repeat", 1) or 1
    file = logdir / METRICS_FILE
    lines = file.read_text().splitlines()
    steps, frames, values, keys, bad = [], [], [], set(), []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict):
            bad.append(number)
            continue
        keys.update(entry)
        value = entry.get(metric)
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if "step" not in entry and "frames" not in entry:
            raise ScoreError(f"{file}:{number}: has '{metric}' but neither 'step' nor 'frames'")
        step = entry.get("step", entry.get("frames", 0) / repeat)
        steps.append(float(step))
        frames.append(float(entry.get("frames", float(step) * repeat)))
        values.append(float(value))
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        warnings.warn(f"{file}: skipped {len(bad)} of {len(lines)} lines that are not complete JSON objects "
                      f"(line {shown})", stacklevel=2)
    return Curve(
        path=logdir, task=str(config["task"]), seed=_seed(config["seed"]), metric=metric,
        step=np.array(steps), frames=np.array(frames), value=np.array(values), keys=frozenset(keys),
    )


def final_score(curve: Curve, last: int = 1) -> float | None:
    """Mean of the last `last` evaluations; values logged at the same step count as one evaluation."""
    if last < 1:
        raise ValueError(f"last must be >= 1, got {last}")
    if not len(curve.value):
        return None
    return float(per_evaluation(curve).value[-last:].mean())


def per_evaluation(curve: Curve) -> Curve:
    """One value per logged step, in step order: the mean of the values logged at that step.

    Evaluations write one line per episode at the same step; averaged first, an evaluation of
    many episodes weighs as much as one of few when curves are binned or summarised.
    """
    steps, index = np.unique(curve.step, return_inverse=True)
    counts = np.bincount(index, minlength=len(steps))
    mean = np.bincount(index, weights=curve.value, minlength=len(steps)) / np.maximum(counts, 1)
    frames = np.bincount(index, weights=curve.frames, minlength=len(steps)) / np.maximum(counts, 1)
    return replace(curve, step=steps.astype(float), frames=frames, value=mean)


def _seed(value: Any) -> int | str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return int(number) if number.is_integer() else str(value)


# Collecting scores from inputs.


@dataclass(frozen=True)
class Score:
    """A final score of one (method, task, seed) with where it came from."""

    method: str
    task: str
    seed: int | str
    score: float
    source: str
    frames: float | None = None


def scores_from_logdirs(paths: Sequence[str | Path], method: str, metric: str = "eval_return",
                        last: int = 1) -> tuple[list[Score], list[Curve], list[Curve]]:
    """Final scores of the Atari runs at or below `paths`.

    Also returns the runs without a value for `metric` yet, and the runs of non-Atari tasks
    (skipped, so a shared logdir with e.g. CartPole runs still works). An `atari_` task that
    Table K1 lacks is an error, since it is most likely a typo.
    """
    scores, empty, skipped, seen_keys = [], [], [], set()
    for path in paths:
        for logdir in find_logdirs(path):
            curve = read_curve(logdir, metric)
            if not is_atari(curve.task):
                skipped.append(curve)
                continue
            seen_keys |= curve.keys
            check_task(curve.task, str(logdir / CONFIG_FILE))
            value = final_score(curve, last)
            if value is None:
                empty.append(curve)
                continue
            frames = float(curve.frames[-1]) if len(curve.frames) else None
            scores.append(Score(method, curve.task, curve.seed, value, str(logdir), frames))
    if not scores and empty and metric not in seen_keys:
        known = ", ".join(sorted(key for key in seen_keys if key not in ("step", "frames", "time"))[:12])
        raise ScoreError(f"metric '{metric}' appears in no {METRICS_FILE}; keys seen: {known or 'none'}")
    return scores, empty, skipped


def scores_from_csv(path: str | Path, method: str) -> list[Score]:
    """Rows of a CSV with columns task,score and optional seed and method."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScoreError(f"cannot read {path}: {exc.strerror}") from None
    reader = csv.DictReader(line for line in text.splitlines() if line.strip())
    columns = [name.strip() for name in reader.fieldnames or []]
    if "task" not in columns or "score" not in columns:
        raise ScoreError(f"{path} needs a header with columns task,score (optional: seed, method); "
                         f"got {','.join(columns) or 'nothing'}")
    scores = []
    for number, row in enumerate(reader, 2):
        row = {key.strip(): (value or "").strip() for key, value in row.items() if key}
        task = check_task(row["task"], f"{path}:{number}")
        try:
            value = float(row["score"])
        except ValueError:
            raise ScoreError(f"{path}:{number}: score {row['score']!r} is not a number") from None
        seed = _seed(row.get("seed") or 0)
        scores.append(Score(row.get("method") or method, task, seed, value, f"{path}:{number}"))
    if not scores:
        raise ScoreError(f"{path} has a header but no score rows")
    return scores


def group_scores(scores: Iterable[Score]) -> dict[str, dict[int | str, dict[str, float]]]:
    """method -> seed -> task -> score; the same (method, seed, task) twice is an error."""
    grouped: dict[str, dict[int | str, dict[str, float]]] = {}
    sources: dict[tuple, str] = {}
    for item in scores:
        key = (item.method, item.seed, item.task)
        if key in sources:
            raise ScoreError(
                f"two scores for {item.task} seed {item.seed} of '{item.method}' ({sources[key]} and "
                f"{item.source}); label inputs as NAME=PATH to compare methods"
            )
        sources[key] = item.source
        grouped.setdefault(item.method, {}).setdefault(item.seed, {})[item.task] = item.score
    return grouped


def seed_order(seed: int | str) -> tuple[int, Any]:
    """Sort key placing integer seeds first, numerically."""
    return (0, seed) if isinstance(seed, int) else (1, str(seed))


def split_label(text: str, default: str) -> tuple[str, Path]:
    """'NAME=PATH' -> (NAME, PATH); a plain path (even one containing '=') keeps the default name."""
    name, sep, rest = text.partition("=")
    if sep and name and rest and not Path(text).expanduser().exists():
        return name, Path(rest).expanduser()
    return default, Path(text).expanduser()


def not_text_error(path: Path, exc: UnicodeDecodeError) -> ScoreError:
    """The one-line error for a binary file among the inputs, naming the file (the exception does not)."""
    files = [path] if path.is_file() else [
        logdir / name for logdir in find_logdirs(path) for name in (CONFIG_FILE, METRICS_FILE)]
    for file in files:
        try:
            file.read_text()
        except UnicodeDecodeError as found:
            return ScoreError(f"{file} is not a text file (binary data at byte {found.start})")
        except OSError:
            continue
    return ScoreError(f"{path}: not text ({exc.reason})")
