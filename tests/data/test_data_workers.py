"""A trainer killed with SIGKILL takes its loader workers with it (PyTorch's and DALI's)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastuda.data.loaders import dali_available

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import os, sys, time
from fastuda.config import DataConfig, DatasetConfig
from fastuda.data.loaders import build_train_iterator
root, loader = sys.argv[1], sys.argv[2]
cfg = DataConfig(source=DatasetConfig(name="synthetic_source", root=root),
                 target=DatasetConfig(name="synthetic_target", root=root),
                 val=DatasetConfig(name="synthetic_target", root=root, split="val"),
                 crop_size=[64, 64], batch_size=2, num_workers=2, loader=loader)
stream = build_train_iterator(cfg, cfg.source, stream=0, seed=0)
next(stream)
print("ready", flush=True)
time.sleep(600)
"""


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...); None once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    pids = (int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit())
    return [k for k in pids if (fields := _stat(k)) is not None and int(fields[1]) == pid]


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_workers_die_with_a_killed_trainer(loader: str, synthetic_root: Path) -> None:
    if loader == "dali" and not dali_available():
        pytest.skip("DALI is not installed")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    # a session of its own, so that whatever survives can be cleaned up after the test
    trainer = subprocess.Popen([sys.executable, "-c", CHILD, str(synthetic_root), loader],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        assert trainer.stdout is not None
        line = trainer.stdout.readline()
        assert line.strip() == "ready", line + trainer.stdout.read()
        workers = _children(trainer.pid)
        assert len(workers) >= 2, workers  # DALI starts a helper besides its two workers
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        # the kernel kills them at once; PyTorch's own watchdog would take up to 5 s, DALI's
        # workers would wait forever
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(map(_alive, workers)):
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], "workers outlived the trainer"
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing of the session is left
            os.killpg(trainer.pid, signal.SIGKILL)
