"""Loader worker processes die with the trainer.

A trainer killed with SIGKILL (the out-of-memory killer, a cluster's preemption) cannot tell its
workers to stop. PyTorch's DataLoader workers notice within a few seconds; DALI's parallel
external-source workers wait forever, holding memory and the terminal. Each worker therefore asks
the kernel (Linux ``prctl(PR_SET_PDEATHSIG)``) to be killed the moment its parent is gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent_pid: int) -> None:
    """Have this process killed when ``parent_pid`` (its parent) dies; no-op off Linux."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def torch_worker_init(parent_pid: int, worker_id: int) -> None:
    """``worker_init_fn`` of the DataLoaders (bound to the trainer's pid with functools.partial)."""
    exit_with_parent(parent_pid)
