"""One training process per logdir: a lock file in the logdir, held while the run lives.

The lock is an exclusive `flock` on LOGDIR/run.lock, which the kernel releases when the process ends
however it ends (also on kill -9), so a crashed run never leaves it stuck. The file records the
holder's pid and host for the refusal message. A file left by a process that is gone (it names this
host, or another host and was not refreshed for `stale_after` seconds) is taken over with a warning.
The holder refreshes the file's mtime every `heartbeat` seconds: on file systems whose locks do not
reach other hosts, that is how a live run on another node is still recognised.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

LOCK_FILE = "run.lock"
STALE_AFTER = 120.0  # seconds without a refresh after which another host's lock counts as abandoned
HEARTBEAT = 30.0


class LogdirInUse(RuntimeError):
    """Another live process holds the logdir's lock. Scripts exit with status 2."""

    exit_status = 2


class RunLock:
    """Context manager holding LOGDIR/run.lock; raises LogdirInUse when another process holds it."""

    def __init__(self, logdir: str | Path, stale_after: float = STALE_AFTER, heartbeat: float = HEARTBEAT):
        self.logdir = Path(logdir)
        self.path = self.logdir / LOCK_FILE
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock or raise LogdirInUse naming the holder; OSError if the logdir is not writable."""
        if self._fd is not None:
            return
        self._stop = threading.Event()
        fd, locked = self._open_locked()
        try:
            previous = _read(fd)
            if previous:
                self._check_previous(previous, locked)
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3)}
            data = (json.dumps(me) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if self.heartbeat > 0:
            self._thread = threading.Thread(target=self._refresh, name="runlock-heartbeat", daemon=True)
            self._thread.start()

    def release(self) -> None:
        """Clear and unlock the file (an empty lock file means a free logdir)."""
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            os.ftruncate(self._fd, 0)
        except OSError:  # e.g. the file system went read-only: the content is only informative
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    def _open_locked(self) -> tuple[int, bool]:
        """An open descriptor of the lock file and whether flock holds it."""
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise LogdirInUse(f"logdir {self.logdir} is in use by {_describe(holder)} (lock file "
                                  f"{self.path}); wait for that run to end or use another --logdir") from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                warnings.warn(f"cannot lock {self.path} on this file system ({exc.strerror}); only the pid and "
                              "host in it guard against a second run", RuntimeWarning, stacklevel=3)
                return fd, False
            # The file may have been replaced between open and flock: then the lock is on a dead inode.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd, True
            os.close(fd)
        raise LogdirInUse(f"cannot take the lock {self.path}: it keeps being replaced by another process")

    def _check_previous(self, previous: dict[str, Any], locked: bool) -> None:
        """The file names a holder although flock was free (or unsupported): take over or refuse."""
        pid, host = previous.get("pid"), previous.get("host")
        holder = _describe(previous)
        if host == socket.gethostname():
            if not locked and isinstance(pid, int) and pid != os.getpid() and _alive(pid):
                raise LogdirInUse(f"logdir {self.logdir} is in use by {holder} (lock file {self.path}); "
                                  "wait for that run to end or use another --logdir")
            # With flock held by nobody, a live pid is another process by now (or the logdir was copied).
            state = "no longer holds it" if isinstance(pid, int) and _alive(pid) else "is no longer running"
            warnings.warn(f"taking over the stale lock {self.path} of {holder}, which {state}",
                          RuntimeWarning, stacklevel=3)
            return
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except OSError:
            age = float("inf")
        if age < self.stale_after:
            raise LogdirInUse(f"logdir {self.logdir} is in use by {holder} (lock file {self.path}, refreshed "
                              f"{age:.0f} s ago); if that run has ended, wait {self.stale_after:.0f} s or "
                              "delete the lock file")
        warnings.warn(f"taking over the lock {self.path} of {holder}: not refreshed for {age:.0f} s, so that run "
                      "has ended", RuntimeWarning, stacklevel=3)

    def _refresh(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self._fd)
            except OSError:  # a full or read-only disk must not kill the run from this thread
                pass


def read_holder(logdir: str | Path) -> dict[str, Any] | None:
    """The pid/host record in LOGDIR/run.lock, or None when there is none (the lock may still be free)."""
    try:
        fd = os.open(Path(logdir) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read(fd)
    finally:
        os.close(fd)


def _read(fd: int) -> dict[str, Any] | None:
    """The JSON record in the lock file; None when empty or unreadable (no run wrote it completely)."""
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data.decode("utf-8", errors="replace")) if data.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
