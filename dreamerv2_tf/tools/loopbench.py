"""The training loop on its real task for a fixed number of updates, and where its wall clock goes.

`bench_loop` runs `Training.run()` in a temporary logdir: a short prefill, one pretraining update, a
few untimed updates of the loop to trace its graphs, then `updates` timed ones, one log write (the
world-model report with its open-loop video) and one checkpoint. The loop's stopwatch (the time_*
sections of metrics.jsonl) gives seconds per update for the update itself, the policy, the envs and
the replay, and seconds per log and per save. With log and save costs spread over the config's own
`log_every` and `checkpoint_every`, the result says what fraction of a long run's wall clock lies
outside `agent.train`. Evaluation is left out (`eval_eps` 0): its episodes are policy and env steps
whose number the config sets, not overhead of training.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from dreamerv2_tf import config as configlib
from dreamerv2_tf.loop.rundir import locked_logdir
from dreamerv2_tf.loop.training import Training

PER_UPDATE = ("update", "policy", "env", "replay")


class _FixedUpdates(Training):
    """Training whose loop does `warmup` untimed updates, then `updates` timed ones and one log write.

    The warm-up traces the policy (the prefill's is random) and, with one log write, the report, so no
    timed part pays for compiling a graph or opening a file.
    """

    def __init__(self, *args: Any, updates: int, warmup: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.warmup, self.timed = warmup, updates
        self.phase, self.until = "start", 0  # start -> warmup -> timed -> done

    def running(self) -> bool:
        if self.phase == "start":  # the first check: after prefill and pretraining
            self.phase, self.until = "warmup", self.updates + self.warmup
        if self.updates < self.until:
            return True
        if self.phase == "warmup":
            self.log()  # traces the report and opens the log files, first-time costs a long run pays once
            self.stopwatch.start()
            self.phase, self.until = "timed", self.updates + self.timed
            return True
        if self.phase == "timed":
            self.log()
            self.phase = "done"
        return False


def loop_config(config: configlib.Config) -> configlib.Config:
    """The config with run lengths for a benchmark: a prefill just large enough for a few batches, one
    pretraining update, no periodic evaluation, logs or checkpoints (one of each kind is timed at the end)."""
    batch = config.dataset.batch * config.dataset.length
    return config.update({"prefill": min(int(config.prefill), 2 * batch), "pretrain": 1, "eval_eps": 0,
                          "steps": 10**12, "log_every": 0, "checkpoint_every": 0, "logdir": ""})


def bench_loop(config: configlib.Config, updates: int, warmup: int = 2) -> dict[str, Any]:
    """Run the loop for `updates` updates; the timings as a JSON-ready dict (see the module docstring)."""
    if updates < 1:
        raise ValueError(f"the loop benchmark needs at least 1 update, got {updates}")
    cadence = {"log": config.log_every, "save": config.checkpoint_every}
    run_config = loop_config(config)
    with tempfile.TemporaryDirectory(prefix="dreamerv2_loop_bench_") as directory:
        logdir = Path(directory) / "run"
        with locked_logdir(logdir):
            training = _FixedUpdates(run_config, logdir, updates=updates, warmup=warmup)
            try:
                training.run()
            finally:
                training.close()
        wall, spent = training.stopwatch.totals()
        done = updates - (training.until - training.updates)  # fewer after a stop request
    loop_s = wall - spent.get("log", 0.0) - spent.get("save", 0.0)
    per_update = {name: spent.get(name, 0.0) / done for name in PER_UPDATE}
    per_update["other"] = max(0.0, loop_s / done - sum(per_update.values()))
    # A long run's wall clock per update, with logs and checkpoints at the config's cadence.
    updates_per = {name: every / config.train_every * config.train_steps for name, every in cadence.items()}
    amortized = dict(per_update)
    for name, count in updates_per.items():
        amortized[name] = spent.get(name, 0.0) / count if count > 0 else 0.0
    total = sum(amortized.values())
    steps = done // config.train_steps * config.train_every
    return {
        "updates": done,
        "agent_steps": steps,
        "loop_s": round(loop_s, 3),
        "agent_steps_per_s": round(steps / loop_s, 2),
        "updates_per_s": round(done / loop_s, 4),
        "seconds_per_update": {name: round(value, 5) for name, value in per_update.items()},
        "log_s": round(spent.get("log", 0.0), 3),
        "save_s": round(spent.get("save", 0.0), 3),
        "updates_per_log": updates_per["log"],
        "updates_per_save": updates_per["save"],
        "fractions_at_config_cadence": {name: round(value / total, 5) for name, value in amortized.items()},
        "outside_update_fraction": round(1.0 - amortized["update"] / total, 5),
    }


__all__ = ["bench_loop", "loop_config"]
