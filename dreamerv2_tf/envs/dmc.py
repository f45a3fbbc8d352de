"""DeepMind Control Suite tasks: rendered pixels under 'image' (unless image=False) plus proprioceptive vectors.

Rendering is headless; MuJoCo picks its OpenGL backend from MUJOCO_GL, which
must be set before dm_control is imported. We default it to 'egl' (GPU
machines, or Mesa's software EGL on CPU); set MUJOCO_GL=osmesa where only
libOSMesa is available.
"""

from __future__ import annotations

import ctypes
import difflib
import glob
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from dreamerv2_tf.envs import base

# The suite's default camera is 0 for every domain except quadruped, whose camera 0 is far away.
DEFAULT_CAMERAS = {"quadruped": 2}


MESA_LIBRARIES = {
    "osmesa": ("libOSMesa.so.8", "libOSMesa.so.6", "libOSMesa.so"),
    "egl": tuple(pattern for libdir in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                                        "/usr/lib64", "/usr/lib")
                 for pattern in (f"{libdir}/dri/swrast_dri.so", f"{libdir}/libgallium*.so")),
}
_isolated = False


def _isolate_mesa_llvm() -> None:
    """Keep Mesa's LLVM apart from TensorFlow's.

    Mesa's software renderer (llvmpipe, used by OSMesa and by EGL without a GPU) links its own
    LLVM, and TensorFlow exports another LLVM from its framework library. In one process, calls
    from either side end up in the other's LLVM and crash. Importing TensorFlow first and then
    loading Mesa with RTLD_DEEPBIND makes Mesa bind to its own copy. Env worker processes never
    load TensorFlow and skip the import. Without Mesa (e.g. NVIDIA EGL) nothing is loaded here.
    """
    global _isolated
    if _isolated:
        return
    _isolated = True
    deepbind = getattr(os, "RTLD_DEEPBIND", 0)
    if not deepbind:
        return
    if not base.IN_ENV_WORKER and importlib.util.find_spec("tensorflow") is not None:
        import tensorflow  # noqa: F401
    for pattern in MESA_LIBRARIES.get(os.environ.get("MUJOCO_GL", ""), ()):
        for path in sorted(glob.glob(pattern)) if "/" in pattern else [pattern]:
            try:
                ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL | deepbind)
            except OSError:
                continue


def _suite():
    os.environ.setdefault("MUJOCO_GL", "egl")
    _isolate_mesa_llvm()
    from dm_control import suite

    return suite


def split_task(name: str) -> tuple[str, str]:
    """'ball_in_cup_catch' -> ('ball_in_cup', 'catch'); ValueError with close names when unknown."""
    tasks = {f"{domain}_{task}": (domain, task) for domain, task in _suite().ALL_TASKS}
    if name in tasks:
        return tasks[name]
    close = difflib.get_close_matches(name, list(tasks), n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join('dmc_' + item for item in close)}" if close else ""
    raise ValueError(f"unknown DMC task '{name}'{hint}")


class DMC:
    """One control suite task; actions in [-1, 1] are rescaled to the task's bounds."""

    def __init__(self, name: str, *, seed: int = 0, action_repeat: int = 2,
                 size: tuple[int, int] = (64, 64), camera: int = -1, image: bool = True, scalars: str = "vector"):
        if action_repeat < 1:
            raise ValueError(f"action_repeat must be at least 1, got {action_repeat}")
        domain, task = split_task(name)
        self._env = _suite().load(domain, task, task_kwargs={"random": int(seed)})
        self._repeat = int(action_repeat)
        self._size = (int(size[0]), int(size[1]))
        self._camera = DEFAULT_CAMERAS.get(domain, 0) if camera < 0 else int(camera)
        spec = self._env.action_spec()
        self._low = np.asarray(spec.minimum, np.float64)
        self._high = np.asarray(spec.maximum, np.float64)
        self._keys = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        vectors = {}
        for key, array in self._env.observation_spec().items():
            if key in ("image", "reward") or key in base.FLAG_KEYS:
                raise ValueError(f"DMC observation key '{key}' clashes with a reserved key")
            self._keys.append(key)
            # Scalars such as walker 'height': 1-vectors the MLP encoder reads, or, as in the release, scalars
            # that the networks (which read rank-1 keys) skip.
            keep_scalar = scalars == "scalar" and not array.shape
            self._shapes[key] = () if keep_scalar else (int(np.prod(array.shape)) or 1,)
            vectors[key] = base.vector_space(self._shapes[key])
        # Rendering costs more than the physics; proprioceptive runs can do without the image.
        self._image = bool(image)
        images = {"image": base.image_space(self._size, 3)} if self._image else {}
        self.obs_space = {**images, **vectors, **base.flag_spaces()}
        self.act_space = base.continuous_act_space(int(np.prod(spec.shape)))

    def reset(self) -> dict[str, np.ndarray]:
        step = self._env.reset()
        return self._obs(step, 0.0, first=True)

    def step(self, action: Mapping[str, Any]) -> dict[str, np.ndarray]:
        scaled = base.rescale_action(action, self._low, self._high)
        reward = 0.0
        for _ in range(self._repeat):
            step = self._env.step(scaled)
            reward += float(step.reward or 0.0)
            if step.last():
                break
        # The suite ends episodes by time limit with discount 1; a zero discount is a real termination.
        terminal = bool(step.last() and step.discount == 0)
        return self._obs(step, reward, last=step.last(), terminal=terminal)

    def close(self) -> None:
        # Free the OpenGL context now: left to interpreter exit, its cleanup thread is already gone.
        if self._env is not None:
            self._env.physics.free()
            self._env.close()
            self._env = None

    def _obs(self, step: Any, reward: float, first: bool = False, last: bool = False,
             terminal: bool = False) -> dict[str, np.ndarray]:
        obs = {}
        if self._image:
            image = self._env.physics.render(*self._size, camera_id=self._camera)
            obs["image"] = np.ascontiguousarray(image, np.uint8)
        for key in self._keys:
            obs[key] = np.asarray(step.observation[key], np.float32).reshape(self._shapes[key])
        obs.update(base.flags(reward, first=first, last=last, terminal=terminal))
        return obs
