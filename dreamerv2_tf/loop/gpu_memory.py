"""How much of each GPU TensorFlow takes (config key `gpu_memory`).

By default TensorFlow reserves nearly all of a GPU's memory when it first uses it, so a second process
on the same GPU fails out of memory. `growth` makes it allocate as needed, and a number caps it at that
many MiB (a logical device of that size). Either must be set before TensorFlow initialises its GPUs,
so the training run applies it before anything else touches TensorFlow.
"""

from __future__ import annotations

import warnings

from dreamerv2_tf.config import gpu_memory_setting


def configure_gpu_memory(value: str | int) -> str:
    """Apply `gpu_memory` to every visible GPU; returns the start-up line that says what was done.

    When TensorFlow has already initialised its GPUs (another user of TensorFlow in the same process),
    the setting cannot apply any more: a warning says so and the GPUs stay as they are.
    """
    import tensorflow as tf

    setting = gpu_memory_setting(value)
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return f"gpu_memory: {setting} (no GPU visible)"
    count = f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''}"
    try:
        for gpu in gpus:
            if setting == "growth":
                tf.config.experimental.set_memory_growth(gpu, True)
            elif isinstance(setting, int):
                tf.config.set_logical_device_configuration(
                    gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=setting)])
    except RuntimeError:  # "Physical devices cannot be modified after being initialized"
        warnings.warn(f"gpu_memory {setting} not applied: TensorFlow had already initialised its GPUs in "
                      "this process", RuntimeWarning, stacklevel=2)
        return f"gpu_memory: {setting} not applied (GPUs already initialised)"
    what = {"all": "TensorFlow reserves nearly all memory", "growth": "memory allocated as needed"}
    return f"gpu_memory: {setting} ({what.get(setting, f'at most {setting} MiB')} on {count})"
