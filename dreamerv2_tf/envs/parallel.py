"""Run each env in its own worker thread or process, built on concurrent.futures.

A worker owns one env for its whole life: a single-worker executor runs every
call in the same thread (or process), which also keeps thread-bound resources
such as OpenGL contexts valid. Proxies satisfy the env protocol and add
`reset_async()` / `step_async(action)` returning futures, so the driver can step
all workers at once and then collect the results.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from dreamerv2_tf.envs import base

# The env owned by this worker process (each process hosts exactly one).
_WORKER_ENV: Any = None
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class WorkerDied(RuntimeError):
    """The process hosting an env ended (killed, out of memory, a crash in native code); one line."""


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this process when the trainer dies, even by SIGKILL.

    Nothing else would end it: the worker holds both ends of its own task queue, so it never sees the
    queue close, and it keeps multiprocessing's resource tracker alive with it. On Linux the kernel
    sends SIGKILL when the parent's spawning thread (the trainer's main thread) ends; elsewhere a
    thread watches the parent pid.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent:  # the parent died before the request took effect
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _process_make(ctor: Callable[[], Any]) -> tuple[dict, dict]:
    global _WORKER_ENV
    base.IN_ENV_WORKER = True
    _WORKER_ENV = ctor()
    return _WORKER_ENV.obs_space, _WORKER_ENV.act_space


def _process_call(method: str, *args: Any) -> Any:
    return getattr(_WORKER_ENV, method)(*args)


class _Proxy:
    """Shared logic; subclasses choose the executor and how a call reaches the env."""

    def __init__(self, executor: futures.Executor):
        self._executor = executor
        self._closed = False
        self.obs_space: dict = {}
        self.act_space: dict = {}

    def _submit(self, method: str, *args: Any) -> futures.Future:
        raise NotImplementedError

    def _result(self, future: futures.Future) -> Any:
        return future.result()

    def reset_async(self) -> futures.Future:
        return self._submit("reset")

    def step_async(self, action: Mapping[str, Any]) -> futures.Future:
        return self._submit("step", {key: np.asarray(value) for key, value in action.items()})

    def reset(self) -> dict[str, np.ndarray]:
        return self._result(self.reset_async())

    def step(self, action: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return self._result(self.step_async(action))

    def result(self, future: futures.Future) -> Any:
        """Wait for a future from reset_async/step_async, translating worker crashes."""
        return self._result(future)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._submit("close").result(timeout=30)
        except Exception:  # noqa: BLE001 - the worker may already be gone; shutting down regardless
            pass
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self._executor.shutdown(wait=False, cancel_futures=True)


class ThreadEnv(_Proxy):
    """Env built and stepped in a dedicated thread (good when stepping releases the GIL)."""

    def __init__(self, ctor: Callable[[], Any]):
        super().__init__(futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="env"))
        try:
            self._env = self._executor.submit(ctor).result()
        except BaseException:
            self._closed = True
            self._executor.shutdown(wait=False)
            raise
        self.obs_space = self._env.obs_space
        self.act_space = self._env.act_space

    def _submit(self, method: str, *args: Any) -> futures.Future:
        return self._executor.submit(getattr(self._env, method), *args)


class ProcessEnv(_Proxy):
    """Env built and stepped in a dedicated process; `ctor` must be picklable (e.g. functools.partial).

    Processes are spawned, not forked: forking a parent that has started TensorFlow's threads
    can deadlock the child.
    """

    def __init__(self, ctor: Callable[[], Any]):
        context = multiprocessing.get_context("spawn")
        super().__init__(futures.ProcessPoolExecutor(max_workers=1, mp_context=context,
                                                     initializer=_die_with_parent, initargs=(os.getpid(),)))
        self._process: Any = None
        try:
            future = self._executor.submit(_process_make, ctor)
            # The pool starts its one process on the first submit; kept to name it if it dies.
            self._process = next(iter(getattr(self._executor, "_processes", {}).values()), None)
            self.obs_space, self.act_space = self._result(future)
        except BaseException:
            self._closed = True
            self._executor.shutdown(wait=True, cancel_futures=True)
            raise

    def _result(self, future: futures.Future) -> Any:
        try:
            return future.result()
        except BrokenProcessPool:
            raise WorkerDied(self._death()) from None

    def _death(self) -> str:
        """How the worker process ended, for WorkerDied."""
        if self._process is None:
            return "its worker process died; see its error output above"
        self._process.join(5)  # its exit status, once the pool has reaped it
        code = self._process.exitcode
        if code is not None and code < 0 and -code in signal.valid_signals():
            how = f"killed by {signal.Signals(-code).name}"
        else:  # a Python error in the worker prints its traceback there
            how = ("" if code is None else f"exit status {code}; ") + "see its error output above"
        return f"its worker process {self._process.pid} died ({how})"

    def _submit(self, method: str, *args: Any) -> futures.Future:
        try:
            return self._executor.submit(_process_call, method, *args)
        except BrokenProcessPool:  # it died during an earlier call
            raise WorkerDied(self._death()) from None
