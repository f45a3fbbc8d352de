"""Stopping a run whose updates went non-finite, before the bad state is saved or trained on."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# float16: a run stops after this many updates in a row that the loss scaler skipped (non-finite gradients).
MAX_SKIPPED_IN_A_ROW = 20


class Diverged(ValueError):
    """Training went non-finite; the run stopped without saving. Scripts exit with status 1."""

    exit_status = 1


class DivergenceCheck:
    """Stops a run whose updates go non-finite, before the bad state can be saved or trained on.

    Called with the metrics of each update: in float32 (and bfloat16) any non-finite `*_loss` or
    `*_grad_norm` raises Diverged, since the update has already written NaN into the weights. In float16
    the loss scaler skips an update with non-finite gradients (a non-finite `*_grad_norm`, counted in
    `*_skipped_updates`) and leaves the weights as they were; only `max_skipped` skipped updates in a
    row of one optimizer stop the run. Returns the metrics as floats: they are fetched anyway for
    logging, and fetching them per update costs a few microseconds each.
    """

    def __init__(self, precision: str, last_checkpoint: Callable[[], str | None],
                 max_skipped: int = MAX_SKIPPED_IN_A_ROW):
        self.scaled = precision == "16"
        self.last_checkpoint = last_checkpoint
        self.max_skipped = max_skipped
        self.update = 0
        self._skipped_in_a_row: dict[str, int] = collections.Counter()

    def __call__(self, metrics: Mapping[str, Any], update: int) -> dict[str, float]:
        values = {key: float(value) for key, value in metrics.items()}
        self.update = update
        bad = [key for key, value in values.items()
               if key.endswith(("_loss", "_grad_norm")) and not math.isfinite(value)]
        if not self.scaled:
            if bad:
                self._stop(f"non-finite {', '.join(bad)}")
            return values
        for key, value in values.items():
            if key.endswith("_grad_norm"):
                name = key[:-len("_grad_norm")]
                self._skipped_in_a_row[name] = 0 if math.isfinite(value) else self._skipped_in_a_row[name] + 1
        over = sorted(name for name, count in self._skipped_in_a_row.items() if count > self.max_skipped)
        if over:
            count = max(self._skipped_in_a_row[name] for name in over)
            self._stop(f"the float16 loss scaler skipped {count} updates in a row (non-finite gradients) for "
                       f"the {', '.join(over)} optimizer{'s' if len(over) > 1 else ''}; non-finite "
                       f"{', '.join(bad) or 'gradients'}")
        return values

    def check_weights(self, variables: Sequence[Any]) -> None:
        """Raise Diverged when a weight is NaN or inf (checked before every save)."""
        from dreamerv2_tf.algo.agent import nonfinite_variables

        bad = nonfinite_variables(variables)
        if bad:
            self._stop(f"non-finite weights in {len(bad)} variables, e.g. {bad[0]}")

    def _stop(self, what: str) -> None:
        latest = self.last_checkpoint()
        where = f"the last good checkpoint is {latest}" if latest else "no checkpoint had been saved yet"
        raise Diverged(f"training diverged at update {self.update:,}: {what}; stopped without saving, {where}")


__all__ = ["Diverged", "DivergenceCheck", "MAX_SKIPPED_IN_A_ROW"]
