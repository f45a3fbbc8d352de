"""Which observation keys the encoder and decoder read. Free of TensorFlow, so that the FLOP counter
(`tools/flops.py`) uses the same rule without building any network."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence


def select_keys(obs_shapes: Mapping[str, Sequence[int]], cnn_keys: str, mlp_keys: str) -> tuple[list, list]:
    """Image keys (rank 3) matching `cnn_keys` and vector keys (rank 1) matching `mlp_keys`, as the nets do."""
    for name, pattern in (("cnn_keys", cnn_keys), ("mlp_keys", mlp_keys)):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{name}: invalid regex '{pattern}': {exc}") from None
    cnn = [k for k, s in obs_shapes.items() if len(s) == 3 and re.fullmatch(cnn_keys, k)]
    mlp = [k for k, s in obs_shapes.items() if len(s) == 1 and re.fullmatch(mlp_keys, k)]
    if not cnn and not mlp:
        raise ValueError(f"no observation key matches cnn_keys '{cnn_keys}' or mlp_keys '{mlp_keys}'; "
                         f"observation keys: {', '.join(obs_shapes) or 'none'}")
    return cnn, mlp
