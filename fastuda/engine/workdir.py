"""The work dir of one run: its folders, and the lock that lets one trainer at a time use it.

The lock is an OS file lock (``flock``) on ``WORK_DIR/.lock``, held for the life of the run; the
kernel releases it when the process ends in any way (SIGKILL included), so a lock is never stale.
The file also records the holder's pid for the message a second trainer gets.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"
SUBDIRS = ("checkpoints", "tensorboard", "vis")


class WorkDirError(RuntimeError):
    """The work dir cannot be used (a file in the way, no permission, a full disk, in use)."""


def prepare_work_dir(work_dir: Path) -> None:
    """Create the work dir and its folders; a file where a folder belongs, or a folder that cannot
    be created, is one WorkDirError naming the path."""
    for path in (work_dir, *(work_dir / name for name in SUBDIRS)):
        if path.exists() and not path.is_dir():
            raise WorkDirError(f"{path} is a file, not a folder; remove it or choose another "
                               "--work-dir")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise WorkDirError(f"cannot create the folder {path}: {err.strerror or err}") from None


class WorkDirLock:
    """``with WorkDirLock(work_dir):`` - exclusive use of ``work_dir`` by this process."""

    def __init__(self, work_dir: Path) -> None:
        self.path = work_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise WorkDirError(f"cannot create the lock file {self.path}: "
                               f"{err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkDirError(f"{self.path.parent} is in use by another trainer (pid {holder}); "
                               "wait for it to finish or choose another --work-dir") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:
            os.close(fd)
            raise WorkDirError(f"cannot write the lock file {self.path}: "
                               f"{err.strerror or err}") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> WorkDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
