"""DreamerV2 in TensorFlow 2 / Keras 3.

Importing the package is cheap: TensorFlow-heavy modules load on first use.
"""

__version__ = "0.1.0"

__all__ = ["train", "load_agent", "Config", "__version__"]


def __getattr__(name: str):
    if name == "Config":
        from dreamerv2_tf.config import Config

        return Config
    if name == "train":
        from dreamerv2_tf.loop.training import train

        return train
    if name == "load_agent":
        from dreamerv2_tf.policy import load_agent

        return load_agent
    raise AttributeError(f"module 'dreamerv2_tf' has no attribute '{name}'")
