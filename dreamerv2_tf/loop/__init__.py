"""The machinery that feeds the algorithm: env driver, replay, training loop, evaluation, checkpoints,
logs and distribution."""
