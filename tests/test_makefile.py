"""The Makefile's build switch: the CUDA kernels compile only where a GPU is listed, unless the
environment asks (CI exports FASTUDA_CUDA=1 to prove they compile)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHOW = "show: ; @echo $$FASTUDA_CUDA"


def _make_sees(env: dict[str, str]) -> str:
    out = subprocess.run(["make", "-s", "-C", str(REPO), "--eval", SHOW, "show"], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _gpu_listed() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return bool(out.stdout.strip())


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_builds_cuda_only_with_a_gpu_unless_told() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FASTUDA_CUDA"}
    assert _make_sees(env) == ("auto" if _gpu_listed() else "0")
    for forced in ("0", "1"):
        assert _make_sees({**env, "FASTUDA_CUDA": forced}) == forced
